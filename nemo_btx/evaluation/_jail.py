"""The process side of the sandbox: isolate itself, then run one untrusted program.

Run as `python -I _jail.py` by `sandbox.py`, never imported. It reads one job (JSON) from stdin
and answers on stdout with one JSON line. It imports only the standard library so that the
start-up stays cheap (one of these runs per HumanEval completion).

Process tree (namespace mode, when the harness is root and the kernel allows it):

    harness ── jail (root, own session) ── init (pid 1 of new pid/net/mount/ipc/uts namespaces)
                                                └─ worker (sandbox uid, no privileges, rlimits)

The jail only waits for init. Init sets up the mount namespace, forks the worker and reaps
until the worker exits; when init exits the kernel kills every process left in the pid
namespace (fork bombs, daemons, processes that escaped with setsid), and when the jail is
killed by the harness, init dies with it (PR_SET_PDEATHSIG). Plain mode (not root, or no
namespaces) skips the namespaces: the jail drops privileges itself and a Python audit hook
refuses network, signals, subprocesses and writes outside the working directory.

The answer line carries a nonce the harness sent, and is written only after the program
returned: a program that exits early (os._exit(0), sys.exit(0), a signal) never "passes".
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 4096, 8192, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

#: Modules plain mode imports before dropping privileges: the interpreter's own files may be
#: unreadable to the sandbox uid (e.g. a pyenv Python under /root, mode 0700).
PRELOAD = ("typing", "math", "random", "copy", "string", "collections", "re", "hashlib",
           "itertools", "functools", "heapq", "bisect", "fractions", "statistics", "decimal",
           "json", "datetime", "operator", "numbers", "array", "textwrap", "unicodedata",
           "dataclasses", "enum", "abc", "contextlib", "io", "time", "cmath", "sys", "os",
           "socket", "subprocess", "shutil", "signal")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _mount_points():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def _expose(path, staging):
    """Make `path` reachable for the sandbox uid when a parent directory is private (0700).

    The directory tree is read-only-bind-mounted aside, a tmpfs hides the private parent, and
    the bind mount is moved back to the same path inside it: only `path` becomes visible, the
    rest of the private directory stays hidden.
    """
    parts = os.path.abspath(path).split("/")[1:]
    for i in range(1, len(parts)):
        parent = "/" + "/".join(parts[:i])
        if os.stat(parent).st_mode & 0o001:
            continue
        os.makedirs(staging, exist_ok=True)
        _mount(path, staging, None, MS_BIND | MS_REC)
        _mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        inside = os.path.abspath(path)
        os.makedirs(inside, exist_ok=True)
        _mount(staging, inside, None, MS_MOVE)
        return


def setup_mounts(job):
    """Private mount tree: everything read-only except a small private /tmp and /dev/shm."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    tmp_size = f"size={job['tmpfs_mb']}m,mode=1777"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_size)
    for i, path in enumerate(sorted({os.path.realpath(p) for p in job["expose"]})):
        if os.path.isdir(path):
            try:
                _expose(path, f"/tmp/.expose{i}")
            except OSError:
                pass  # the interpreter may still be readable; if not, imports fail visibly
    ours = {"/tmp", "/proc"}
    for point in reversed(_mount_points()):
        if point in ours or point.startswith("/tmp/"):
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
        except OSError:
            pass  # e.g. mounts the kernel locks; still protected by permissions and uid
    if os.path.isdir("/dev/shm"):
        try:
            _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777")
        except OSError:
            pass
    try:  # a /proc of the new pid namespace: the host's processes are not even visible
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV)
    except OSError:
        pass


def drop_privileges(job):
    uid = job["uid"]
    if os.getuid() == 0 and uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    cpu = int(job["timeout"]) + 1
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (job["memory_mb"] << 20,) * 2,
        resource.RLIMIT_FSIZE: (job["fsize_mb"] << 20,) * 2,
        resource.RLIMIT_NOFILE: (job["nofile"],) * 2,
        resource.RLIMIT_NPROC: (job["nproc"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_MEMLOCK: (0, 0),
    }
    for res, value in limits.items():
        resource.setrlimit(res, value)


def install_guard(workdir):
    """Plain mode only: refuse what the kernel does not refuse without namespaces."""
    workdir = os.path.realpath(workdir)
    blocked = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
               "socket.getaddrinfo", "os.kill", "os.killpg", "os.system", "os.exec",
               "os.posix_spawn", "os.spawn", "subprocess.Popen", "ctypes.dlopen",
               "ctypes.dlsym", "ctypes.cdata", "os.fork", "os.forkpty", "pty.spawn"}

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args and isinstance(args[0], (str, bytes)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            path = os.path.realpath(os.fsdecode(args[0]))
            if writing and not (path == workdir or path.startswith(workdir + "/")
                                or path == os.devnull):
                raise PermissionError(f"sandbox: writing {path} is not allowed")
        if event in ("os.remove", "os.rename", "os.rmdir", "os.chmod", "os.chown",
                     "shutil.rmtree", "os.truncate", "os.link", "os.symlink"):
            for a in args:
                if isinstance(a, (str, bytes)):
                    path = os.path.realpath(os.fsdecode(a))
                    if not path.startswith(workdir + "/"):
                        raise PermissionError(f"sandbox: {event} {path} is not allowed")

    sys.addaudithook(hook)


def run_worker(job, out_fd, workdir, guard):
    """Never returns: run the program, report, exit."""
    nonce = job.pop("nonce")
    program = job.pop("program")
    try:
        drop_privileges(job)
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                           "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"})
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if guard:
            install_guard(workdir)
    except BaseException as err:  # noqa: BLE001 - report every set-up failure, then stop
        _answer(out_fd, nonce, "error", f"sandbox setup: {err!r}")
        os._exit(3)
    try:
        code = compile(program, "<program>", "exec")
        exec(code, {"__name__": "__main__"})  # noqa: S102 - this is the point of the sandbox
    except BaseException as err:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail too
        _answer(out_fd, nonce, "failed", f"{type(err).__name__}: {err}"[:500])
        os._exit(1)
    _answer(out_fd, nonce, "passed", "")
    os._exit(0)


def _answer(fd, nonce, status, detail):
    try:
        os.write(fd, (json.dumps({"nonce": nonce, "status": status, "detail": detail}) + "\n").encode())
    except OSError:
        pass


def _wait_for(pid):
    """Reap children until `pid` exits; return its wait status."""
    while True:
        try:
            got, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if got == pid:
            return status


def _exit_like(status):
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def main():
    job = json.loads(sys.stdin.read())
    out_fd = os.dup(1)
    os.set_inheritable(out_fd, False)
    if job["mode"] == "plain":
        for name in PRELOAD:
            try:
                __import__(name)
            except ImportError:
                pass
        run_worker(job, out_fd, job["workdir"], guard=True)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS),
           "unshare")
    alive_r, alive_w = os.pipe()  # EOF on alive_r = the jail is gone
    init = os.fork()
    if init:
        os.close(alive_r)
        _exit_like(_wait_for(init))
    # init: pid 1 of the new namespaces, still privileged inside them
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.close(alive_w)
    if select.select([alive_r], [], [], 0)[0]:  # the jail died before PDEATHSIG was armed
        os._exit(1)
    os.close(alive_r)
    try:
        setup_mounts(job)
        workdir = "/tmp/work"
        os.mkdir(workdir, 0o700)
        if job["uid"] is not None:
            os.chown(workdir, job["uid"], job["uid"])
    except BaseException as err:  # noqa: BLE001
        _answer(out_fd, job["nonce"], "error", f"sandbox mounts: {err!r}")
        os._exit(3)
    worker = os.fork()
    if worker == 0:
        run_worker(job, out_fd, workdir, guard=False)
    os.close(out_fd)
    _exit_like(_wait_for(worker))


if __name__ == "__main__":
    main()
