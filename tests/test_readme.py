"""The README's two set-up commands exist, and its run command does the main job."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README has no Quick start code block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands():
    assert quickstart_commands() == ["make run", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M), ".ci/run must call the README's test command"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1200)
def test_readme_run_command_runs_the_main_job(tmp_path):
    """`make run` is the whole experiment ending in its report (here on a small budget)."""
    sys.path.insert(0, str(REPO / "tests" / "stages"))
    from test_pipeline import SMALL

    rd = tmp_path / "tiny"
    proc = subprocess.run(
        ["make", "-C", str(REPO), "run", f"VENV={sys.prefix}", f"ARGS=run.dir={rd} {' '.join(SMALL)}"],
        capture_output=True, text=True, timeout=1200, env=clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((rd / "report" / "report.json").read_text())
    assert report["missing"] == []
    for name in ("report.md", "report.html"):
        assert (rd / "report" / name).stat().st_size > 1000
    assert (rd / "config.yaml").is_file()
