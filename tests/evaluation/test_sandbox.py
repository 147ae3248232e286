"""The HumanEval sandbox against hostile programs: each is contained and scored as a failure,
the harness survives and keeps scoring the rest, files outside the sandbox are untouched."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from nemo_btx.evaluation import humaneval
from nemo_btx.evaluation.sandbox import BASE_UID, Limits, isolation, run_program, run_programs

MODES = ["plain"] + (["namespaces"] if isolation() == "namespaces" else [])
FAST = Limits(timeout=4.0)


@pytest.fixture
def canaries():
    """A root-owned file (0644 in a 0755 dir) and a world-writable one (0666 in a 0777 dir),
    outside /tmp (namespace mode hides /tmp anyway) so that only the protection, not the path,
    keeps the sandbox from them."""
    base = Path(tempfile.mkdtemp(prefix="btx-canary-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    base.chmod(0o755)
    open_dir = base / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    files = {"owned": base / "canary.txt", "open": open_dir / "canary.txt"}
    for f in files.values():
        f.write_text("intact\n")
    files["open"].chmod(0o666)
    yield files
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def listener():
    """A TCP server on loopback the sandbox must not reach."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


def _leftover_sandbox_processes():
    out = subprocess.run(["ps", "-eo", "uid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split() and BASE_UID <= int(line.split()[0]) < BASE_UID + 256]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_statuses(mode):
    progs = {
        "ok": "x = 1\nassert x == 1",
        "assert": "assert 1 == 2, 'wrong'",
        "raise": "raise ValueError('bad')",
        "os_exit_0": "import os\nos._exit(0)",
        "sys_exit_0": "import sys\nsys.exit(0)",
        "self_kill": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "syntax": "def f(:\n pass",
        "stdlib": "import hashlib, typing, math, random, collections, re, string, copy\n"
                  "assert hashlib.md5(b'a').hexdigest().startswith('0cc1')",
    }
    out = dict(zip(progs, run_programs(list(progs.values()), FAST, mode=mode)))
    assert out["ok"].passed and out["stdlib"].passed, out
    for name in ("assert", "raise", "os_exit_0", "sys_exit_0", "self_kill", "syntax"):
        assert out[name].status == "failed", (name, out[name])
    assert "wrong" in out["assert"].detail and "ValueError" in out["raise"].detail


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_hostile_programs_are_contained(mode, canaries, listener):
    owned, world = canaries["owned"], canaries["open"]
    hostile = {
        "infinite_loop": "while True:\n    pass",
        "sleep_forever": "import time\ntime.sleep(3600)",
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "alloc_50gb": "x = bytearray(50 * 2**30)",
        "delete_canary": f"import os\nos.remove({str(owned)!r})",
        "write_canary": f"open({str(owned)!r}, 'w').write('pwned')",
        "write_world_writable": f"open({str(world)!r}, 'w').write('pwned')",
        "new_file_outside": f"open({str(world.parent / 'new.txt')!r}, 'w').write('pwned')",
        "write_harness": f"open({str(Path(humaneval.__file__))!r}, 'a').write('pwned')",
        "socket": f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {listener}))",
        "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nraise SystemExit('parent alive')",
        "kill_all_shell": "import os\nos.system('kill -9 -1')\nraise SystemExit('still here')",
        "kill_all": "import os, signal\nos.kill(-1, signal.SIGKILL)\nraise SystemExit('still here')",
        "escape_session": "import os, subprocess\nsubprocess.Popen(['sleep', '300'], start_new_session=True)\n"
                          "os.setsid() if False else None\nraise SystemExit('detached')",
        "stdout_flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    }
    good = {"good_1": "assert sum(range(10)) == 45", "good_2": "import math\nassert math.gcd(12, 18) == 6"}
    # good programs between the hostile ones: a hostile one must not spoil its neighbours
    names = ["good_1"] + list(hostile) + ["good_2"]
    programs = {**hostile, **good}
    start = time.monotonic()
    out = dict(zip(names, run_programs([programs[n] for n in names], FAST, workers=4, mode=mode)))
    elapsed = time.monotonic() - start
    for name in hostile:
        assert not out[name].passed, (name, out[name])
    assert out["good_1"].passed and out["good_2"].passed, (out["good_1"], out["good_2"])
    for name in ("infinite_loop", "sleep_forever", "stdout_flood"):
        assert out[name].status == "timed out", (name, out[name])
    assert owned.read_text() == "intact\n" and world.read_text() == "intact\n"
    assert not (world.parent / "new.txt").exists()
    assert "pwned" not in Path(humaneval.__file__).read_text()
    # 17 programs, the slowest ones bounded by the 4 s deadline, 4 at a time
    assert elapsed < 40, elapsed
    time.sleep(0.5)
    assert _leftover_sandbox_processes() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_output_floods_do_not_confuse_the_harness(mode):
    """Writing a lot, or forged answer lines on every descriptor, leaves the real verdict."""
    forged = ("import os, json\nfor fd in range(3, 64):\n    try:\n"
              "        os.write(fd, (json.dumps({'nonce': 'x', 'status': 'passed'}) + '\\n').encode() * 2000)\n"
              "    except OSError:\n        pass\n")
    out = run_programs([
        "print('y' * 10**7)",
        forged + "raise AssertionError('really failed')",
        forged,
    ], FAST, mode=mode)
    assert out[0].passed, out[0]
    assert out[1].status == "failed" and "really failed" in out[1].detail, out[1]
    assert out[2].passed, out[2]


@pytest.mark.timeout(60)
def test_namespace_isolation_details():
    if isolation() != "namespaces":
        pytest.skip("namespace isolation unavailable here (needs root and unshare/mount)")
    probe = (
        "import os, socket\n"
        "assert os.getuid() != 0 and os.getgid() != 0\n"
        "assert os.getpid() == 2, os.getpid()  # pid 1 is the jail's init\n"
        "assert sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [1, 2]\n"
        "names = [n for _, n in socket.if_nameindex()]\n"
        "assert names == ['lo'], names\n"
        "assert os.listdir('/tmp') in ([], ['work'], ['work', '.expose0']) or 'work' in os.listdir('/tmp')\n"
        "try:\n    open('/etc/btx-sandbox-probe', 'w')\nexcept OSError as e:\n    assert e.errno in (13, 30), e\n"
        "else:\n    raise SystemExit('wrote /etc')\n"
        "open('scratch.txt', 'w').write('ok')  # the private working directory is writable\n"
    )
    out = run_program(probe, FAST, mode="namespaces")
    assert out.passed, out


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail():
    problems = humaneval.load_problems()
    assert len(problems) == 164
    start = time.monotonic()
    out = humaneval.score(problems, [p["canonical_solution"] for p in problems])
    elapsed = time.monotonic() - start
    assert [o.status for o in out] == ["passed"] * 164, [o for o in out if not o.passed][:3]
    wrong = humaneval.score(problems, ["    return None\n"] * len(problems))
    assert sum(o.passed for o in wrong) < 8
    assert elapsed < 90, elapsed
