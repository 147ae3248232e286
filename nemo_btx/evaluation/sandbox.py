"""Run model-written programs (HumanEval completions) as hostile code.

A completion can loop forever, fork-bomb, allocate 50 GB, flood its output, open sockets, kill
its parent or `kill -9 -1`, delete files, or exit early to fake a pass. Each program therefore
runs in its own process tree with, where the harness runs as root and the kernel allows it
(checked once, `isolation()`):

- new pid, network, mount, IPC and UTS namespaces: it sees only its own processes (so `kill -1`
  and `os.getppid()` reach nothing of ours), has no network interface but a down loopback, and
  every mount is read-only except a private, size-limited /tmp tmpfs (its working directory);
- an unprivileged uid of its own per concurrent slot (so RLIMIT_NPROC counts its processes
  only and slots cannot signal each other), no capabilities, `no_new_privs` (setuid binaries
  cannot raise it back);
- RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC and a wall-clock deadline;
  when the deadline passes the jail's session is SIGKILLed, which kills the namespace's init
  and, by the kernel, everything left in it.

Without namespaces (not root, or a kernel that refuses) the fallback ("plain") keeps the
rlimits, the session, the uid change when root, and a Python audit hook that refuses sockets,
signals, subprocesses, ctypes and writes outside the working directory; it is weaker (native
code can bypass an audit hook), and `isolation()` says which one is in force.

The harness never hangs on a program: reads are bounded in time and size, and every job ends
with a status ("passed", "failed", "timed out", "error"). Many programs run in parallel
worker threads (`run_programs`), each thread owning one sandbox uid.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

log = logging.getLogger(__name__)

JAIL = Path(__file__).with_name("_jail.py")
#: First uid of the per-slot sandbox users (no passwd entry needed; far above real users).
BASE_UID = 0x30000
#: Longest answer line kept (the real one is under 1 KB; a program can write there too).
MAX_LINE_BYTES = 4096


@dataclass(frozen=True)
class Limits:
    """Per-program resource limits (the defaults fit HumanEval's tests with a wide margin)."""

    timeout: float = 10.0
    """Wall-clock seconds; HumanEval's own harness uses 3 s of execution, the rest is start-up
    headroom for a loaded 2-core machine."""
    memory_mb: int = 1024
    """RLIMIT_AS: address space, which is what a 50 GB allocation hits."""
    fsize_mb: int = 16
    nofile: int = 64
    nproc: int = 16
    """Processes of the sandbox uid: bounds a fork bomb."""
    tmpfs_mb: int = 64
    """Size of the private /tmp in namespace mode."""


@dataclass
class Outcome:
    """What happened to one program."""

    status: str
    """passed | failed | timed out | error"""
    detail: str = ""
    seconds: float = 0.0
    mode: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class _Slot:
    index: int
    uid: Optional[int] = field(default=None)


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """'namespaces' when a probe program runs fully isolated, else 'plain'.

    Probed once per process (about 0.1 s): root alone is not enough, containers can refuse
    unshare or mount.
    """
    if os.name != "posix" or os.geteuid() != 0:
        return "plain"
    probe = "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), 1)\nexcept OSError:\n    pass\nelse:\n    raise SystemExit('network reachable')"
    out = _run_one(probe, Limits(timeout=20.0), _Slot(0, BASE_UID), "namespaces")
    if out.passed:
        return "namespaces"
    log.warning("sandbox: namespace isolation unavailable (%s); using the weaker plain mode",
                out.detail or out.status)
    return "plain"


def _expose_paths() -> List[str]:
    """Interpreter directories the sandbox uid must be able to read (imports)."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    return sorted(paths)


def _kill_uid(uid: int) -> None:
    """Plain mode: SIGKILL every process of a sandbox uid (ones that left the session too)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # as that uid: reaches only that uid's processes
        except OSError:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def _run_one(program: str, limits: Limits, slot: _Slot, mode: str) -> Outcome:
    nonce = secrets.token_hex(16)
    workdir = None
    start = time.monotonic()
    if mode == "plain":
        workdir = tempfile.mkdtemp(prefix="btx-sandbox-")
        if slot.uid is not None:
            os.chown(workdir, slot.uid, slot.uid)
    job = {"program": program, "nonce": nonce, "mode": mode, "uid": slot.uid,
           "workdir": workdir, "timeout": limits.timeout, "memory_mb": limits.memory_mb,
           "fsize_mb": limits.fsize_mb, "nofile": limits.nofile, "nproc": limits.nproc,
           "tmpfs_mb": limits.tmpfs_mb, "expose": _expose_paths()}
    proc = subprocess.Popen([sys.executable, "-I", str(JAIL)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, env={"PATH": "/usr/bin:/bin"})
    try:
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        answer, timed_out = _read_answer(proc, nonce, start + limits.timeout)
    finally:
        _terminate(proc, slot, mode)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - start
    if timed_out and answer is None:
        return Outcome("timed out", f"over {limits.timeout:g} s", seconds, mode)
    if answer is None:
        code = proc.returncode
        why = f"killed by signal {code - 128}" if code and code > 128 else f"exit code {code}"
        return Outcome("failed", f"no result ({why})", seconds, mode)
    status = answer["status"] if answer["status"] in ("passed", "failed", "error") else "failed"
    return Outcome(status, str(answer.get("detail", ""))[:500], seconds, mode)


def _read_answer(proc: subprocess.Popen, nonce: str, deadline: float):
    """Scan the answer channel line by line until EOF or the deadline; (answer, timed_out).

    The program can write to the channel too (it is an inherited descriptor): lines without
    our nonce are dropped as they stream by and over-long lines are cut, so a flood costs
    neither memory nor the real answer.
    """
    answer, pending = None, b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return answer, True
            if not sel.select(timeout=min(left, 0.5)):
                continue
            block = os.read(proc.stdout.fileno(), 65536)
            lines = (pending + block).split(b"\n")
            pending = lines.pop()[-MAX_LINE_BYTES:] if block else b""
            for line in lines + ([pending] if not block else []):
                found = _parse_line(line, nonce)
                answer = found if found is not None and answer is None else answer
            if not block:
                return answer, False
    finally:
        sel.close()


def _parse_line(line: bytes, nonce: str) -> Optional[dict]:
    if nonce.encode() not in line:
        return None
    try:
        answer = json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return None
    return answer if isinstance(answer, dict) and answer.get("nonce") == nonce else None


def _terminate(proc: subprocess.Popen, slot: _Slot, mode: str) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if mode == "plain" and slot.uid is not None and os.geteuid() == 0:
        _kill_uid(slot.uid)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL of our own child
        log.error("sandbox: jail %d survived SIGKILL", proc.pid)
    proc.stdout.close()


def run_program(program: str, limits: Limits = Limits(), *, mode: Optional[str] = None) -> Outcome:
    """Run one program; `passed` means it ran to its end without raising."""
    return run_programs([program], limits, workers=1, mode=mode)[0]


def run_programs(programs: Sequence[str], limits: Limits = Limits(), *, workers: Optional[int] = None,
                 mode: Optional[str] = None) -> List[Outcome]:
    """Run programs in parallel sandboxes; outcomes in input order.

    Args:
        workers: concurrent sandboxes; None = twice the CPU count (at least 4): a sandbox
            spends most of its ~0.1 s in namespace set-up and tear-down, not on a CPU.
        mode: 'namespaces' or 'plain'; None = the strongest available (`isolation()`).
    """
    mode = mode or isolation()
    workers = max(1, min(workers or max(4, 2 * (os.cpu_count() or 1)), len(programs) or 1))
    root = os.geteuid() == 0
    slots: "queue.Queue[_Slot]" = queue.Queue()
    for i in range(workers):
        slots.put(_Slot(i, BASE_UID + i if root else None))

    def one(program: str) -> Outcome:
        slot = slots.get()
        try:
            return _run_one(program, limits, slot, mode)
        except Exception as err:  # noqa: BLE001 - one broken job must not stop the others
            log.exception("sandbox: harness error")
            return Outcome("error", f"harness: {err!r}", 0.0, mode)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))
