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
@pytest.mark.timeout(600)
def test_readme_run_command_runs_the_main_job(tmp_path):
    # The same make target, pointed at this interpreter's venv and a scratch run directory.
    proc = subprocess.run(
        ["make", "-C", str(REPO), "run", f"VENV={sys.prefix}",
         f"ARGS=run.dir={tmp_path} smoke.steps=6"],
        capture_output=True, text=True, timeout=600, env=clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "smoke" / "result.json").read_text())
    assert set(result["results"]) == {"dense", "moe"}
    for variant, res in result["results"].items():
        assert len(res["losses"]) == 6
        assert res["losses"][-1] < res["losses"][0] - 0.05, (variant, res["losses"])
    assert (tmp_path / "smoke" / "config.yaml").is_file()
