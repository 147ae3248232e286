"""`nemo-btx launch`: the experiment as a Slurm job chain, rendered and submitted.

The scripts (`slurm.py`: one job per stage, array jobs for experts, baselines and evaluated
models, chained with afterok) are written to `<run.dir>/slurm/` with `submit.sh`,
the exact sbatch commands of this launch. Only units that are not complete are submitted, so
launching again after a failure re-runs just the failed array tasks and what depends on them.
`cluster.dry_run=true` renders without submitting. Job ids go to `<run.dir>/slurm/jobs.json`,
job starts and ends to `events.jsonl`, Slurm logs to `logs/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Sequence

from nemo_btx.artifacts import write_json_atomic, write_text_atomic
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import BtxError
from nemo_btx.orchestration.experiment import check_same_experiment, preflight
from nemo_btx.orchestration.slurm import SUBMIT_SCRIPT, Target, build_jobs, render_files
from nemo_btx.run_dir import RunDir

log = logging.getLogger(__name__)



def run(cfg: ExperimentConfig, overrides: Sequence[str] = (), config_name: str = "config") -> Dict[str, str]:
    """Render the chain into <run.dir>/slurm/ and submit it; return {stage: job id}."""
    preflight(cfg)
    target = Target.for_launch(cfg, overrides, config_name)
    rd = RunDir(target.run_dir(cfg))
    # Plan with absolute paths: the jobs run in cluster.workdir, which may not be this directory.
    planned = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(rd.root)))
    jobs = build_jobs(planned, overrides, config_name)
    out = rd.slurm
    dry = cfg.cluster.dry_run
    if not dry:
        if shutil.which("sbatch") is None:
            raise BtxError("sbatch is not on PATH: launch from a Slurm login node (or start the "
                           "local test cluster: slurm/local_cluster.sh start), or render only "
                           "with cluster.dry_run=true")
        _refuse_if_queued(rd)
        _check_run_dir(cfg, rd)
    files = render_files(planned, target, jobs, only_todo=True)
    for name, text in files.items():
        write_text_atomic(out / name, text)
        os.chmod(out / name, 0o755)
    rd.slurm_logs.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if j.todo]
    for job in jobs:
        tasks = (f"tasks {job.array_spec(job.todo)} of {len(job.units)}" if job.is_array and job.todo
                 else "" if job.todo else "complete")
        log.info("launch: %-18s %-16s time %-10s %s", job.script, tasks, job.time, job.layout_text())
    if dry:
        log.info("launch: dry run: scripts in %s; submit them with: bash %s", out, out / SUBMIT_SCRIPT)
        return {}
    if not todo:
        log.info("launch: every stage of %s is complete; nothing to submit", rd.root)
        return {}
    ids = _submit(out / SUBMIT_SCRIPT, target.workdir)
    write_json_atomic(rd.slurm_jobs, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "workdir": target.workdir,
        "config_name": config_name, "overrides": list(overrides),
        "jobs": {j.key: {"id": ids[j.key], "script": j.script,
                           "array": j.array_spec(j.todo) if j.is_array else None,
                           "units": [j.units[i].name for i in j.todo]} for j in todo}})
    log.info("launch: submitted %d jobs (%s); logs in %s, job ids in %s", len(ids),
             " ".join(f"{s}={i}" for s, i in ids.items()), rd.slurm_logs, rd.slurm_jobs)
    return ids


def _submit(script: Path, workdir: str) -> Dict[str, str]:
    """Run submit.sh; on a failed sbatch cancel what it had submitted and raise."""
    proc = subprocess.run(["bash", str(script)], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    ids: Dict[str, str] = {}
    for line in proc.stdout.splitlines():
        stage, _, job_id = line.strip().partition(" ")
        if job_id.isdigit():
            ids[stage] = job_id
    if proc.returncode != 0:
        if ids:
            subprocess.run(["scancel", *ids.values()], capture_output=True, timeout=60)
        raise BtxError(f"sbatch failed ({script}, exit {proc.returncode})"
                       f"{'; cancelled ' + ' '.join(ids.values()) if ids else ''}:\n{proc.stderr.strip()[-2000:]}")
    return ids


def active_jobs(ids: List[str]) -> List[str]:
    """The ids among `ids` that Slurm still has pending or running (array tasks included)."""
    if not ids:
        return []
    proc = subprocess.run(["squeue", "-h", "-o", "%A %T", "-j", ",".join(ids)], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:  # every id is gone (squeue: "Invalid job id specified")
        return []
    done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
    return sorted({line.split()[0] for line in proc.stdout.splitlines()
                   if len(line.split()) == 2 and line.split()[1] not in done})


def _refuse_if_queued(rd: RunDir) -> None:
    """Two chains in one run directory would train the same unit twice."""
    path = rd.slurm_jobs
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    ids = [str(j["id"]) for j in previous.get("jobs", {}).values()]
    left = active_jobs(ids)
    if left:
        raise BtxError(f"jobs of the previous launch ({path}) are still queued or running: "
                       f"{' '.join(left)}; wait for them, or cancel them (scancel {' '.join(left)}) "
                       "and launch again")


def _check_run_dir(cfg: ExperimentConfig, rd: RunDir) -> None:
    """One run directory, one experiment (as `nemo-btx run` checks); where and how the jobs run
    (cluster.*) may change between launches."""
    from nemo_btx.config import from_yaml, to_yaml

    saved = rd.config
    probe = cfg
    if saved.is_file():
        try:
            probe = dataclasses.replace(cfg, cluster=from_yaml(saved.read_text()).cluster)
        except BtxError:
            pass  # an older config without cluster: compared as it is
    check_same_experiment(probe, rd.root, redo=False)
    write_text_atomic(saved, to_yaml(cfg))
