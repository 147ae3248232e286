"""`nemo-btx run`'s status line comes from the stage's progress file, not from its log text."""

import json
import sys

from nemo_btx import progress


def test_reporter_writes_only_when_asked_and_throttles(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.Reporter("step", 10).update(1)
    assert not path.exists()  # a stage started by hand writes nothing
    monkeypatch.setenv(progress.ENV, str(path))
    monkeypatch.setenv("RANK", "1")
    progress.Reporter("step", 10).update(1)
    assert not path.exists()  # only rank 0 reports
    monkeypatch.setenv("RANK", "0")
    rep = progress.Reporter("step", 10)
    rep.update(1, eta_s=90)
    assert progress.read(path)["done"] == 1
    rep.update(2)  # within a second of the last write: skipped
    assert progress.read(path)["done"] == 1
    rep.update(10)  # the last one is always written
    rec = progress.read(path)
    assert (rec["done"], rec["total"], rec["what"]) == (10, 10, "step")
    assert progress.describe({"what": "step", "done": 5, "total": 300, "eta_s": 40.2}) == "step 5/300, eta 40 s"
    assert progress.describe({"what": "generations", "done": 3, "total": 8, "eta_s": None}) == "3/8 generations"
    path.write_text("{not json")
    assert progress.read(path) is None


class _Recorder:
    def __init__(self):
        self.seen = []

    def update(self, text):
        self.seen.append(text)


def test_run_unit_shows_the_childs_progress_file(tmp_path, monkeypatch):
    """A child that writes progress and logs something else: the display shows the progress."""
    from nemo_btx.orchestration import local
    from nemo_btx.orchestration.units import Unit
    from nemo_btx.run_dir import RunDir

    marker = tmp_path / "done"
    child = ("import time, pathlib\n"
             "from nemo_btx import progress\n"
             "r = progress.Reporter('step', 3)\n"
             "for i in range(1, 4):\n"
             "    print(f'a log line that looks like step {i*7}/99, eta 5s', flush=True)\n"
             "    r.update(i, eta_s=3 - i)\n"
             "    time.sleep(1.1)\n"
             f"pathlib.Path({str(marker)!r}).touch()\n")
    monkeypatch.setattr(local, "command", lambda unit, o, c: [sys.executable, "-c", child])
    unit = Unit("seed", None, ["seed"], [], marker.is_file)
    display = _Recorder()
    rd = RunDir(tmp_path / "run")
    local.run_unit(unit, [], "config", rd, display, lock_fd=0)
    assert "step 3/3, eta 0 s" in display.seen
    assert not any("/99" in s for s in display.seen)  # the log text is not parsed
    assert "looks like step 21/99" in rd.unit_log("seed").read_text()
    assert json.loads(rd.unit_log("seed").with_suffix(".progress.json").read_text())["done"] == 3
