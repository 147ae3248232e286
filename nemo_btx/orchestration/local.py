"""`nemo-btx run`: the whole experiment, stage after stage, in one run directory.

Every stage runs as its own process through the same command a cluster job runs
(`python -m nemo_btx.cli <stage> ...`, under torchrun when its layout has more than one rank),
so `run` adds no code path of its own: stages still talk only through files. What `run` adds
is the order, skipping what is complete (each stage's output has a completion marker written
last), a live progress line, a log per stage, and the report at the end.

Robustness: a lock on `<run.dir>/.run.lock` keeps two runs out of one directory (children
inherit it, so a new run waits until a killed run's processes are gone); children die with
`run` (Linux parent-death signal); `--from`/`--only` move the outputs they redo to
`<run.dir>/replaced/<time>/` instead of deleting them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from nemo_btx import progress
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import BtxError
from nemo_btx.orchestration.experiment import check_same_experiment, preflight
from nemo_btx.orchestration.units import Unit, command, nproc_of, pending, plan, select, with_missing_needs
from nemo_btx.run_dir import RunDir

log = logging.getLogger(__name__)


def _set_pdeathsig(sig: int) -> Callable[[], None]:
    """Child setup: receive `sig` when `run` dies, so a killed run leaves no stage running."""
    def setup() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
        except OSError:  # pragma: no cover - not Linux
            pass
    return setup


class Display:
    """One status line on a terminal, plain log lines otherwise (batch jobs, CI, pipes)."""

    def __init__(self, total: int):
        self.total, self.tty = total, sys.stderr.isatty()
        self.start = time.monotonic()
        self.last_log = 0.0
        self.lock = threading.Lock()
        self.unit, self.index, self.unit_start, self.progress = "", 0, 0.0, ""

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.start)
        return f"{s // 60}:{s % 60:02d}"

    def begin(self, index: int, unit: Unit) -> None:
        with self.lock:
            self.unit, self.index, self.unit_start, self.progress = unit.name, index, time.monotonic(), ""
            ranks = f" on {unit.nproc} processes ({unit.layout})" if unit.nproc > 1 else ""
            self._line(f"[{index}/{self.total}] {unit.name}{ranks} ...", force=True)

    def update(self, progress: str) -> None:
        with self.lock:
            self.progress = progress
            if self.tty or time.monotonic() - self.last_log > 30:
                self._line(f"[{self.index}/{self.total}] {self.unit}: {progress}")

    def end(self, unit: Unit, status: str) -> None:
        with self.lock:
            took = time.monotonic() - self.unit_start
            self._line(f"[{self.index}/{self.total}] {unit.name}: {status} ({took:.0f} s)", force=True,
                       final=True)

    def _line(self, text: str, force: bool = False, final: bool = False) -> None:
        text = f"{text}  [elapsed {self._elapsed()}]"
        self.last_log = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
            sys.stderr.flush()
        elif force or not final:
            log.info("%s", text)


def _child_env(nproc: int, progress_file: Path) -> dict:
    env = dict(os.environ)
    if nproc > 1 and "OMP_NUM_THREADS" not in env:
        # Ranks share the cores this process may use (its affinity, not the host's CPU count);
        # oversubscribed OpenMP threads slow CPU runs 20x. The thread count changes the last
        # bits of a matmul, so it is recorded in the ledger (see the README).
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    env.pop("WORLD_SIZE", None)
    env["PYTHONUNBUFFERED"] = "1"
    env[progress.ENV] = str(progress_file)
    return env


class _ProgressWatcher(threading.Thread):
    """Shows what the child writes to its progress file (nemo_btx/progress.py)."""

    def __init__(self, path: Path, display: Display, interval: float = 0.5):
        super().__init__(daemon=True)
        self.path, self.display, self.interval = path, display, interval
        self.stopped = threading.Event()
        self.last: Optional[dict] = None

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        record = progress.read(self.path)
        if record is not None and record != self.last:
            self.last = record
            self.display.update(progress.describe(record))

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


def run_unit(unit: Unit, overrides: Sequence[str], config_name: str, rd: RunDir, display: Display,
             lock_fd: int) -> None:
    """Run one unit to completion with its output in logs/<unit>.log; raise on failure."""
    log_path = rd.unit_log(unit.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    progress_file = log_path.with_suffix(".progress.json")
    progress_file.unlink(missing_ok=True)
    cmd = command(unit, overrides, config_name)
    watcher = _ProgressWatcher(progress_file, display)
    with open(log_path, "a") as out:
        out.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=_child_env(unit.nproc, progress_file), pass_fds=(lock_fd,),
            # torchrun turns SIGTERM into stopping its workers; a plain stage can just die.
            preexec_fn=_set_pdeathsig(signal.SIGTERM if unit.nproc > 1 else signal.SIGKILL))
        watcher.start()
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            watcher.stop()
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BtxError(f"stage {unit.name} failed (exit {code}); its log is {log_path}:\n{tail}")
    if not unit.done():
        raise BtxError(f"stage {unit.name} exited 0 but its completion marker is missing; see {log_path}")


def move_aside(units: List[Unit], rd: RunDir) -> Optional[Path]:
    """Move the outputs of units about to be redone into <run.dir>/replaced/<time>/ (kept)."""
    stamp = rd.replaced / time.strftime("%Y%m%d-%H%M%S")
    moved = False
    for unit in units:
        for path in unit.outputs:
            if not path.exists():
                continue
            target = stamp / rd.rel(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            if unit.keep:
                # E.g. the branched copy of the seed: redoing an expert retrains from it.
                target.mkdir(parents=True, exist_ok=True)
                for child in path.iterdir():
                    if child.name not in unit.keep:
                        os.replace(child, target / child.name)
            else:
                os.replace(path, target)
            moved = True
    return stamp if moved else None


def run(cfg: ExperimentConfig, overrides: Sequence[str] = (), config_name: str = "config",
        from_stage: Optional[str] = None, only: Optional[str] = None) -> None:
    rd = RunDir.of(cfg)
    units = plan(cfg)
    redo = select(units, from_stage, only)
    # A bad merge recipe or benchmark data missing on this machine: say so now, not after
    # the training (the CLI has called it already; a library caller may not have).
    preflight(cfg)
    nprocs = {}
    for unit in units:
        if unit.layout not in nprocs:
            nprocs[unit.layout] = nproc_of(unit.layout, overrides, config_name,
                                           gpus=cfg.cluster.gpus_per_node, stage=unit.stage)
        unit.nproc = nprocs[unit.layout]
    redo_ids = {id(u) for u in redo}
    pending_ids = {id(u) for u in pending(units)}
    todo = with_missing_needs(units, redo) if only else [u for u in units if id(u) in redo_ids | pending_ids]
    report = units[-1]
    if todo and not only and all(u is not report for u in todo):
        todo.append(report)  # new results: the report is rebuilt
    rd.root.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(rd.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("run: %s is in use by another run (or a killed run's last processes); waiting", rd)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.set_inheritable(lock_fd, True)
        check_same_experiment(cfg, rd.root, redo=bool(redo))
        if redo:
            moved = move_aside(redo, rd)
            if moved:
                log.info("run: previous outputs of %s moved to %s", ", ".join(u.name for u in redo), moved)
        if not todo:
            log.info("run: every stage of %s is complete; nothing to do (--from STAGE redoes one)", rd.root)
            return
        display = Display(len(units))
        started = time.monotonic()
        todo_ids = {id(u) for u in todo}
        for index, unit in enumerate(units, 1):
            if id(unit) in todo_ids:
                display.begin(index, unit)
                run_unit(unit, overrides, config_name, rd, display, lock_fd)
                display.end(unit, "done")
        log.info("run: finished %d stage(s) in %.0f s", len(todo), time.monotonic() - started)
        report_md = rd.report / "report.md"
        if report_md.is_file():
            print(_headline(report_md.read_text()), flush=True)
            log.info("run: report at %s (and report.html, report.json)", report_md)
    finally:
        os.close(lock_fd)


def _headline(markdown: str) -> str:
    """The report's findings count and its Table 1, for the console at the end of a run."""
    lines = markdown.splitlines()
    out = [line for line in lines if "checked claims hold" in line][:1]
    start = next((i for i, line in enumerate(lines) if line.startswith("**Table 1")), None)
    if start is not None:
        out.append(lines[start])
        for line in lines[start + 1:]:
            if line.startswith("|") or not line.strip():
                if line.strip():
                    out.append(line)
                elif len(out) > 2:
                    break
            else:
                break
    return "\n".join(out)
