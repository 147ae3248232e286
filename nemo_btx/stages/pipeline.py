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
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.stages.common import domain_names, run_dir

log = logging.getLogger(__name__)

#: Stages in pipeline order (the names --from / --only take).
STAGES = ("data", "seed", "branch", "experts", "mix", "finetune", "upcycle", "baselines", "eval",
          "report")
BASELINE_DIRS = {"upcycle_data": "baselines/upcycle/data_matched",
                 "upcycle_compute": "baselines/upcycle/compute_matched",
                 "dense_compute": "baselines/dense"}
BASELINE_EVAL = {"upcycle_data": "upcycle-data", "upcycle_compute": "upcycle-compute",
                 "dense_compute": "dense"}


@dataclass
class Unit:
    """One process of the pipeline: a stage command, or one item of it (a domain, a model)."""

    stage: str
    item: Optional[str]
    args: List[str]
    """CLI arguments after the global overrides: the command and the unit's own overrides."""
    outputs: List[Path]
    """What the unit writes; --from/--only move these aside before redoing it."""
    done: Callable[[], bool]
    layout: Optional[str] = None
    """conf/parallel preset for this unit (run.layouts.<stage>)."""
    nproc: int = 1

    @property
    def name(self) -> str:
        return self.stage if self.item is None else f"{self.stage}:{self.item}"


def _marker(path: Path) -> Callable[[], bool]:
    return lambda: path.is_file()


def plan(cfg: ExperimentConfig) -> List[Unit]:
    """Every unit of the experiment, in order."""
    rd = run_dir(cfg)
    names = domain_names(cfg)
    layouts = cfg.run.layouts
    units = [
        Unit("data", None, ["data"], [rd / "tokenizer", rd / "data"], _marker(rd / "data" / "manifest.json")),
        Unit("seed", None, ["seed"], [rd / "seed"], _marker(rd / "seed" / "manifest.json"), layouts.seed),
        Unit("branch", None, ["branch"], [rd / "experts" / d / "init" for d in names],
             lambda: all((rd / "experts" / d / "init" / "btx_checkpoint.json").is_file() for d in names)),
    ]
    for d in names:
        units.append(Unit("experts", d, ["train-expert", f"domain={d}"], [rd / "experts" / d],
                          _marker(rd / "experts" / d / "manifest.json"), layouts.experts))
    units += [
        Unit("mix", None, ["mix"], [rd / "btx" / "mixed"], _marker(rd / "btx" / "mixed" / "manifest.json"),
             layouts.mix),
        Unit("finetune", None, ["finetune"], [rd / "btx" / "finetuned"],
             _marker(rd / "btx" / "finetuned" / "manifest.json"), layouts.finetune),
    ]
    kinds = list(cfg.baselines.which)
    if any(k.startswith("upcycle") for k in kinds):
        up = rd / "baselines" / "upcycle" / "mixed"
        units.append(Unit("upcycle", None, ["upcycle"], [up], _marker(up / "manifest.json"), layouts.upcycle))
    for kind in kinds:
        if kind not in BASELINE_DIRS:
            raise ConfigError("baselines.which", kind, f"must be among {', '.join(BASELINE_DIRS)}")
        out = rd / BASELINE_DIRS[kind]
        units.append(Unit("baselines", kind, ["baselines", f"baselines.which=[{kind}]"], [out],
                          _marker(out / "manifest.json"), layouts.baselines))
    models = ["seed", *[f"expert-{d}" for d in names], "btm-top1", "btm-top2",
              *[BASELINE_EVAL[k] for k in kinds], "btx"]
    for m in models:
        out = rd / "eval" / m
        units.append(Unit("eval", m, ["eval", f"eval.model={m}"], [out], _marker(out / "results.json"),
                          layouts.eval))
    report = rd / "report"
    units.append(Unit("report", None, ["report"], [report], _marker(report / "report.json")))
    return units


def select(units: List[Unit], from_stage: Optional[str], only: Optional[str]) -> List[Unit]:
    """The units to redo: `--from STAGE[:ITEM]` (it and everything after), `--only A,B:ITEM`."""
    def matches(unit: Unit, spec: str) -> bool:
        stage, _, item = spec.partition(":")
        return unit.stage == stage and (not item or unit.item == item)

    def check(spec: str, flag: str) -> None:
        stage, _, item = spec.partition(":")
        if stage not in STAGES:
            raise ConfigError(flag, spec, f"must be a stage: {', '.join(STAGES)} (optionally STAGE:ITEM)")
        if not any(matches(u, spec) for u in units):
            items = [u.item for u in units if u.stage == stage and u.item]
            raise ConfigError(flag, spec, f"no such item; {stage} has: {', '.join(items) or 'no items'}")

    if from_stage and only:
        raise ConfigError("--from", from_stage, "give --from or --only, not both")
    if from_stage:
        check(from_stage, "--from")
        first = next(i for i, u in enumerate(units) if matches(u, from_stage))
        return units[first:]
    if only:
        specs = [s for s in only.split(",") if s]
        for s in specs:
            check(s, "--only")
        return [u for u in units if any(matches(u, s) for s in specs)]
    return []


def nproc_of(layout: Optional[str], overrides: Sequence[str], config_name: str) -> int:
    """Processes a stage needs at its layout (the smallest world the layout fits)."""
    if layout is None:
        return 1
    from nemo_btx.config import load_config
    from nemo_btx.config.validate import min_world_size

    cfg = load_config([*overrides, f"parallel={layout}"], config_name=config_name)
    return cfg.parallel.world_size or min_world_size(cfg.parallel)


def _set_pdeathsig(sig: int) -> Callable[[], None]:
    """Child setup: receive `sig` when `run` dies, so a killed run leaves no stage running."""
    def setup() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
        except OSError:  # pragma: no cover - not Linux
            pass
    return setup


_STEP = re.compile(r"step (\d+)/(\d+).*?eta (\d+)s")
_TQDM = re.compile(r"(\d+)/(\d+) \[[\d:]+<([\d:?]+)")


def _progress_of(line: str) -> Optional[str]:
    """A short progress text from a child's log line (training steps or lm-eval's bars)."""
    m = _STEP.search(line)
    if m:
        return f"step {m.group(1)}/{m.group(2)}, eta {m.group(3)} s"
    m = _TQDM.search(line)
    if m:
        return f"{m.group(1)}/{m.group(2)} requests, eta {m.group(3)}"
    return None


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


def _child_env(nproc: int) -> dict:
    env = dict(os.environ)
    if nproc > 1 and "OMP_NUM_THREADS" not in env:
        # Ranks share the machine's cores; oversubscribed OpenMP threads slow CPU runs 20x.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env.pop("WORLD_SIZE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(unit: Unit, overrides: Sequence[str], config_name: str) -> List[str]:
    """The command line a unit runs (what a cluster job script runs for it, too)."""
    cli = ["-m", "nemo_btx.cli", "--config-name", config_name, *unit.args, *overrides]
    if unit.layout:
        cli.append(f"parallel={unit.layout}")
    if unit.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={unit.nproc}", *cli]
    return [sys.executable, *cli]


def run_unit(unit: Unit, overrides: Sequence[str], config_name: str, logs: Path, display: Display,
             lock_fd: int) -> None:
    """Run one unit to completion with its output in logs/<unit>.log; raise on failure."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{unit.name.replace(':', '-')}.log"
    cmd = command(unit, overrides, config_name)
    with open(log_path, "a") as out:
        out.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=_child_env(unit.nproc), pass_fds=(lock_fd,),
            # torchrun turns SIGTERM into stopping its workers; a plain stage can just die.
            preexec_fn=_set_pdeathsig(signal.SIGTERM if unit.nproc > 1 else signal.SIGKILL))
        assert proc.stdout is not None
        try:
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                out.write(chunk.decode(errors="replace"))
                out.flush()
                for piece in re.split(rb"[\r\n]", chunk)[::-1]:
                    progress = _progress_of(piece.decode(errors="replace"))
                    if progress:
                        display.update(progress)
                        break
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BtxError(f"stage {unit.name} failed (exit {code}); its log is {log_path}:\n{tail}")
    if not unit.done():
        raise BtxError(f"stage {unit.name} exited 0 but its completion marker is missing; see {log_path}")


def move_aside(units: List[Unit], rd: Path) -> Optional[Path]:
    """Move the outputs of units about to be redone into <run.dir>/replaced/<time>/ (kept)."""
    stamp = rd / "replaced" / time.strftime("%Y%m%d-%H%M%S")
    moved = False
    for unit in units:
        for path in unit.outputs:
            if not path.exists():
                continue
            target = stamp / path.resolve().relative_to(rd.resolve())
            target.parent.mkdir(parents=True, exist_ok=True)
            if unit.stage == "experts":
                # Keep the branched copy of the seed: redoing an expert retrains from it.
                target.mkdir(parents=True, exist_ok=True)
                for child in path.iterdir():
                    if child.name != "init":
                        os.replace(child, target / child.name)
            else:
                os.replace(path, target)
            moved = True
    return stamp if moved else None


def _check_same_experiment(cfg: ExperimentConfig, rd: Path, redo: bool) -> None:
    """A run directory holds one experiment: refuse to mix in results of another config."""
    from omegaconf import OmegaConf

    from nemo_btx.artifacts import write_text_atomic
    from nemo_btx.config import to_yaml

    saved_path = rd / "config.yaml"
    text = to_yaml(cfg)
    if saved_path.is_file() and not redo:
        saved = OmegaConf.to_container(OmegaConf.create(saved_path.read_text()))
        now = OmegaConf.to_container(OmegaConf.create(text))
        diff = sorted(_diff(saved, now))
        # Where and how the stages run (layouts, the run dir's own path, the cluster, logging,
        # Hugging Face import/export paths, the HF merge's thread count) does not change what
        # they compute.
        diff = [k for k in diff if not k.startswith(("run.", "cluster.", "hf.", "train.log_interval",
                                                     "mix.threads"))]
        if diff:
            raise ConfigError(diff[0], "changed", f"{rd} holds an experiment with another config "
                              f"(differs in {', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}); "
                              "use another run.dir, or --from STAGE to redo from a stage with this config")
    write_text_atomic(saved_path, text)


def _diff(a, b, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def run(cfg: ExperimentConfig, overrides: Sequence[str] = (), config_name: str = "config",
        from_stage: Optional[str] = None, only: Optional[str] = None) -> None:
    rd = run_dir(cfg)
    units = plan(cfg)
    redo = select(units, from_stage, only)
    # Benchmark data missing on this machine: say so now, not after the training.
    from nemo_btx.evaluation.benchmarks import runnable

    runnable(cfg.eval.tasks, cfg.eval.data_dir, cfg.eval.missing_data)
    nprocs = {}
    for unit in units:
        if unit.layout not in nprocs:
            nprocs[unit.layout] = nproc_of(unit.layout, overrides, config_name)
        unit.nproc = nprocs[unit.layout]
    redo_ids = {id(u) for u in redo}
    todo = list(redo) if only else [u for u in units if id(u) in redo_ids or not u.done()]
    report = units[-1]
    if todo and not only and all(u is not report for u in todo):
        todo.append(report)  # new results: the report is rebuilt
    rd.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(rd / ".run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("run: %s is in use by another run (or a killed run's last processes); waiting", rd)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.set_inheritable(lock_fd, True)
        _check_same_experiment(cfg, rd, redo=bool(redo))
        if redo:
            moved = move_aside(redo, rd)
            if moved:
                log.info("run: previous outputs of %s moved to %s", ", ".join(u.name for u in redo), moved)
        if not todo:
            log.info("run: every stage of %s is complete; nothing to do (--from STAGE redoes one)", rd)
            return
        display = Display(len(units))
        started = time.monotonic()
        todo_ids = {id(u) for u in todo}
        for index, unit in enumerate(units, 1):
            if id(unit) in todo_ids:
                display.begin(index, unit)
                run_unit(unit, overrides, config_name, rd / "logs", display, lock_fd)
                display.end(unit, "done")
        log.info("run: finished %d stage(s) in %.0f s", len(todo), time.monotonic() - started)
        report_md = rd / "report" / "report.md"
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
