"""The README's two set-up commands exist, and its run command does the main job."""

import json
import re
from pathlib import Path

import pytest


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
@pytest.mark.timeout(1500)
def test_readme_run_command_runs_the_main_job(small_experiment):
    """`make run` is the whole experiment ending in its report (here on a small budget)."""
    rd, _, proc = small_experiment
    from nemo_btx.evaluation.benchmarks import unavailable

    report = json.loads((rd / "report" / "report.json").read_text())
    if unavailable("btx_gsm8k") is None:
        assert report["missing"] == []
    else:  # no GSM8K on this machine: skipped, and the report says why for every model
        assert report["missing"] and all("no GSM8K score (skipped: GSM8K: no hub" in m
                                         for m in report["missing"]), report["missing"]
    assert {row["key"] for row in report["tables"]["results"]["rows"]} >= {"seed", "btx", "dense"}
    for name in ("report.md", "report.html"):
        assert (rd / "report" / name).stat().st_size > 1000
    assert (rd / "config.yaml").is_file()
    assert "run: report at" in proc.stderr
    # The run ends by printing the report's findings count and its Table 1.
    assert "checked claims hold" in proc.stdout and "| BTX |" in proc.stdout
