"""bench/gpu_check.sh cannot run here (no GPU): its dry-run mode validates every command it would
run and writes the plan's predictions; its report finds each stage's metrics where the stages
write them and fails when the resumed run's losses differ from the uninterrupted run's."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, clean_env

SCRIPT = REPO / "bench" / "gpu_check.sh"
REPORT = REPO / "bench" / "gpu_check_report.py"


def dry_run(out, gpus):
    env = clean_env(PYTHON=sys.executable, GPUS=str(gpus))
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dry_run_validates_and_predicts(tmp_path):
    proc = dry_run(tmp_path, 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("config OK") == 2 and proc.stdout.count("gpu_check: would run:") == 3
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = [r["stage"] for r in report["stages"]]
    assert stages == ["seed", "experts:code", "experts:math", "experts:wiki", "finetune",
                      "baselines:upcycle-data", "dense"]
    assert all(r["plan_gb"] > 0 and r["measured_gb"] is None and r["gpus"] == 8 for r in report["stages"])
    bad = dry_run(tmp_path / "odd", 3)
    assert bad.returncode == 2 and "use 1 or an even number" in bad.stderr


@pytest.mark.slow
def test_report_reads_each_stage_and_checks_the_resume(tmp_path):
    proc = dry_run(tmp_path, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    overrides = json.loads((tmp_path / "gpu_check.json").read_text())["overrides"]
    run = tmp_path / "run"
    dirs = ["seed", "experts/code", "experts/math", "experts/wiki", "btx/finetuned",
            "baselines/upcycle-data", "baselines/dense"]
    for i, d in enumerate(dirs):
        (run / d).mkdir(parents=True)
        (run / d / "metrics.jsonl").write_text(json.dumps(
            {"step": 1, "loss": 1.0, "tokens_per_s": 1000.0 * (i + 1), "peak_memory_gb": 1.5 + i,
             "mfu": 0.3}) + "\n")
    for tag, loss in (("a", 2.0), ("b", 2.0)):
        (tmp_path / f"resume-{tag}").mkdir()
        (tmp_path / f"resume-{tag}" / "metrics.jsonl").write_text(json.dumps({"loss": loss}) + "\n")
    cmd = [sys.executable, str(REPORT), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["measured_gb"] for r in report["stages"]] == [1.5 + i for i in range(7)]
    assert report["stages"][0]["measured_step_s"] == 16 * 2048 / 1000.0 and report["resume"]["equal"]
    (tmp_path / "resume-b" / "metrics.jsonl").write_text(json.dumps({"loss": 2.5}) + "\n")
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "DIFFER FROM" in proc.stdout
    assert os.access(SCRIPT, os.X_OK)
