"""`nemo-btx launch` on a real two-node Slurm cluster (slurm/local_cluster.sh --nodes 2): each
node's slurmd, and every job process on it, runs in its own network namespace with its own
address on a private bridge, so a 2-node job's torchrun rendezvous and gloo cross a network
interface between two hosts.

The tiny experiment's chain runs as Slurm jobs: the expert array tasks side by side, every job
after its parents. On one node per job it is the reference; over two nodes (experts, mix and
finetune one rank per node) it ends with the same losses, weights and report tables, through a
failed expert task (launching again retrains that expert alone), a preempted 2-node job
(requeued, resumed) and a dead node (the job fails, the chain stops; once the node is back a
relaunch resumes from the last complete checkpoint). A job told to stop before its time limit
requeues and resumes.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SMALL_EXPERIMENT, clean_env, missing_system_package

pytestmark = pytest.mark.slow

# The small experiment with one baseline and perplexity-only evaluation (8 eval tasks); the
# experts, mix and finetune at 2 processes (one per node with cluster.nodes=2).
# The seed's and BTX's evaluations only (perplexity): the chain's scheduling is the same with
# every model's, at a minute less per chain.
CHAIN = [*SMALL_EXPERIMENT, "baselines.which=[dense]", "eval.tasks=[]", "eval.models=[seed,btx]",
         "run.layouts.experts=dp2"]
TWO_NODES = "cluster.nodes=2"
SCRIPT = str(REPO / "slurm" / "local_cluster.sh")
ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def _free_port_pair() -> int:
    for _ in range(100):
        port = random.randrange(20000, 40000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A private Slurm cluster for this module: start, yield its environment, stop."""
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]
    if missing:
        missing_system_package(f"Slurm is not installed ({', '.join(missing)} not found)")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster's slurmd runs as root")
    missing = [b for b in ("ip", "unshare", "nsenter") if shutil.which(b) is None]
    if missing:
        missing_system_package(f"the two-node cluster needs {', '.join(missing)} (iproute2, util-linux)")
    state = tmp_path_factory.mktemp("slurm")
    # BTX_SLURM_INSTALL=0: the script never installs here (the Makefile does).
    env = clean_env(BTX_SLURM_DIR=str(state), BTX_SLURM_PORT=str(_free_port_pair()),
                    BTX_SLURM_INSTALL="0")
    proc = subprocess.run(["bash", SCRIPT, "start", "--nodes", "2"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"local cluster did not start:\n{proc.stdout}\n{proc.stderr}"
    env["SLURM_CONF"] = str(state / "slurm.conf")
    tag = f"btx{env['BTX_SLURM_PORT']}"
    try:
        yield env
    finally:
        proc = subprocess.run(["bash", SCRIPT, "stop"], env=env, capture_output=True, text=True, timeout=120)
        left = [line for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
                + subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
                if tag in line]
        assert proc.returncode == 0 and not left, f"stop left {left}:\n{proc.stderr}"


def cluster(env, *args):
    proc = subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def launch(env, rd, *extra, check=True):
    proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", "launch", f"run.dir={rd}", *CHAIN, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def jobs_of(rd) -> dict:
    return json.loads((Path(rd) / "slurm" / "jobs.json").read_text())["jobs"]


def squeue(env, ids):
    proc = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(ids)], env=env,
                          capture_output=True, text=True, timeout=60)
    return [line.split() for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []


def wait_for(env, rd, timeout=360, until=None):
    """Poll until no job of the last launch is pending or running (or `until()` holds)."""
    ids = [j["id"] for j in jobs_of(rd).values()]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until is not None and until():
            return
        rows = squeue(env, ids)
        if not any(r[1] in ACTIVE for r in rows):
            return
        stuck = [r for r in rows if len(r) > 2 and r[2] in ("PartitionConfig", "ReqNodeNotAvail")]
        assert not stuck, f"jobs the node can never run: {stuck}"
        time.sleep(1)
    pytest.fail(f"jobs still queued after {timeout} s: {squeue(env, ids)}\n{log_tail(rd)}")


def events(rd) -> list:
    path = Path(rd) / "slurm" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def spans(evs) -> dict:
    """unit -> (first start, last end, last rc)."""
    out = {}
    for e in evs:
        start, end, rc = out.get(e["unit"], (None, None, None))
        if e["event"] == "start":
            start = e["time"] if start is None else start
        elif e["event"] == "end":
            end, rc = e["time"], e["rc"]
        out[e["unit"]] = (start, end, rc)
    return out


def log_tail(rd) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1200:]}" for p in sorted((Path(rd) / "slurm" / "logs").glob("*")))


@pytest.fixture(scope="module")
def one_node_chain(slurm, tmp_path_factory):
    """The chain with every job on one node (cluster.nodes=1): the reference run."""
    rd = tmp_path_factory.mktemp("one-node") / "run"
    start = time.monotonic()
    launch(slurm, rd)
    wait_for(slurm, rd)
    return rd, time.monotonic() - start


def test_two_nodes_are_two_hosts(slurm, tmp_path):
    """srun --nodes=2 starts one task per node, each on its own host and address."""
    out = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c",
                          'echo "$(hostname) $(getent hosts "$(hostname)" | cut -d" " -f1) $(ip -o -4 addr | wc -l)"'],
                         env=slurm, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = sorted(line.split() for line in out.stdout.splitlines())
    assert [r[0] for r in rows] == ["btxn1", "btxn2"] and rows[0][1] != rows[1][1], rows
    assert all(int(r[2]) == 2 for r in rows), rows  # loopback and the node's own veth, nothing else


def test_chain_runs_on_local_slurm(slurm, one_node_chain):
    from nemo_btx.config import load_config
    from nemo_btx.orchestration.units import plan

    rd, took = one_node_chain
    graph = plan(load_config([f"run.dir={rd}", *CHAIN]))
    units = [u.name for u in graph]
    span = spans(events(rd))
    failed = {u: span.get(u) for u in units if span.get(u, (0, 0, 1))[2] != 0}
    assert not failed, f"units not completed: {failed}\n{log_tail(rd)}"
    assert (rd / "report" / "report.json").is_file()

    # The expert array tasks ran side by side (2 CPUs, one per task).
    experts = [span[u] for u in units if u.startswith("experts:")]
    overlaps = [(a, b) for i, a in enumerate(experts) for b in experts[i + 1:]
                if max(a[0], b[0]) < min(a[1], b[1])]
    assert overlaps, f"expert tasks did not overlap: {experts}"
    # Every unit started after every unit it needs had ended (the plan's graph).
    for u in graph:
        for need in u.needs:
            assert span[u.name][0] >= span[need][1], f"{u.name} started before {need} ended"
    # Launching again finds every stage complete and submits nothing.
    proc = launch(slurm, rd)
    assert "nothing to submit" in proc.stderr
    print(f"chain of {len(units)} units on Slurm: {took:.0f} s")


def test_failed_tokenize_task_is_redone_alone(slurm, tmp_path):
    """Data at scale on Slurm: a domain of several tokenize units (an array job) and its merge;
    one unit fails; the relaunch redoes only that unit and the merge, and the data equals an
    uninterrupted local build byte for byte."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"part{i}.jsonl").write_text("".join(
            json.dumps({"text": f"document {i}.{j}: " + " ".join(f"w{(i * 31 + j * 7 + k) % 97}" for k in range(60))})
            + "\n" for j in range(8)))
    data = ["data.max_chars_per_domain=null", f"data.domains=[{{name: big, source: '{corpus}'}}]",
            "data.chunk_size=3KB", "data.unit_size=6KB", "data.tokenizer.sample_chars=20000"]
    rd = tmp_path / "run"
    flag = tmp_path / "fail-unit-1"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'if [ "$SLURM_JOB_NAME" = btx-tokenize ] && [ "${{SLURM_ARRAY_TASK_ID:-}}" = 1 ] '
                    f'&& [ -e {flag} ]; then echo "injected failure" >&2; exit 3; fi\n')
    flag.touch()
    extra = [*data, "cluster.only=[tokenizer,tokenize,data]", f"cluster.setup=['. {hook}']"]
    launch(slurm, rd, *extra)
    first = jobs_of(rd)
    assert set(first) == {"tokenizer", "tokenize", "data"} and len(first["tokenize"]["units"]) >= 3
    wait_for(slurm, rd)
    parts = rd / "data" / "big" / "parts"
    markers = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    assert markers and not (rd / "data" / "big" / "manifest.json").exists()
    out = subprocess.run(["scontrol", "show", "job", first["data"]["id"]], env=slurm, capture_output=True,
                         text=True, timeout=60).stdout
    assert "JobState=CANCELLED" in out and "DependencyNeverSatisfied" in out, out

    flag.unlink()
    launch(slurm, rd, *extra)
    second = jobs_of(rd)
    assert set(second) == {"tokenize", "data"} and second["tokenize"]["array"] == "1"
    assert second["tokenize"]["units"] == ["tokenize:big:1"]
    wait_for(slurm, rd)
    assert (rd / "data" / "big" / "manifest.json").is_file(), log_tail(rd)
    # The units that had succeeded were not redone.
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in parts.glob("*.json")) if n in markers} == markers
    # Same bytes as an uninterrupted build in one process.
    ref = tmp_path / "ref"
    proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", "data", f"run.dir={ref}", *CHAIN, *data],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (rd / "data" / "big" / name).read_bytes() == (ref / "data" / "big" / name).read_bytes(), name


def metrics(stage_dir) -> dict:
    """step -> loss of a training stage (metrics.jsonl, cut back on resume)."""
    rows = [json.loads(line) for line in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


def shard_ranks(ckpt) -> set:
    """The ranks whose shard files (__<rank>_<n>.distcp) a checkpoint holds."""
    return {int(f.name.split("_")[2]) for f in Path(ckpt).glob("__*_*.distcp")}


def check_checkpoints(root, ranks=frozenset({0, 1})):
    """Every step-N directory is complete (marker, every shard the metadata names, one from each
    rank); a temporary left by a killed save has no marker, so nothing loads it."""
    from nemo_btx.training.checkpoint import MARKER, complete_checkpoints, verify_files

    found = sorted(p for p in Path(root).iterdir() if p.name.startswith("step-"))
    assert found == complete_checkpoints(root), found
    for ckpt in found:
        verify_files(ckpt)
        assert shard_ranks(ckpt) == ranks, (ckpt, sorted(os.listdir(ckpt)))
    for tmp in Path(root).glob(".*.tmp"):
        assert not (tmp / MARKER).exists(), tmp
    return found


def rank_hosts(rd, job_glob) -> list:
    """The `runtime: rank hosts: 0=btxn1 1=btxn2` lines of a job's Slurm logs."""
    out = []
    for log in sorted((Path(rd) / "slurm" / "logs").glob(job_glob)):
        for line in log.read_text().splitlines():
            if "runtime: rank hosts:" in line:
                out.append(line.split("rank hosts:")[1].split())
    return out


def same_results(rd, ref):
    """Losses of every training stage, final weights and the report's tables equal `ref`'s."""
    from nemo_btx.training.checkpoint import read_tensors

    stages = ["seed", "experts/code", "experts/math", "experts/wiki", "btx/finetuned", "baselines/dense"]
    for stage in stages:
        assert metrics(rd / stage) == metrics(ref / stage), stage
    for model in [*stages, "btx/mixed"]:
        weights = rd / model if model == "btx/mixed" else rd / model / "weights"
        a, b = read_tensors(weights), read_tensors(ref / weights.relative_to(rd))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model
    tables = [json.loads((d / "report" / "report.json").read_text())["tables"] for d in (rd, ref)]
    for name in ("results", "aggregate", "domains", "data"):  # compute/ledger: measured times
        got, want = tables[0][name], tables[1][name]
        if got != want:
            rows = {r["key"]: r for r in want.get("rows", [])}
            diff = [(r["key"], rows.get(r["key"])) for r in got.get("rows", []) if rows.get(r["key"]) != r]
            pytest.fail(f"report table {name} differs: {[k for k in got if got[k] != want.get(k)]}; rows "
                        f"(got, reference): {[(k, r, [x for x in got['rows'] if x['key'] == k]) for k, r in diff]}")


def resumed_from(rd, log_name):
    """The checkpoint directory name a job's log says training resumed from (None: it did not)."""
    for line in (Path(rd) / "slurm" / "logs" / log_name).read_text().splitlines():
        if ": resumed from " in line:
            return Path(line.split(": resumed from ")[1].split(" (step")[0]).name
    return None


def cancelled(env, job_id) -> bool:
    """Slurm cancelled the job because a job it depends on failed."""
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    return "JobState=CANCELLED" in out and "DependencyNeverSatisfied" in out


def wait_path(rd, glob, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = sorted(Path(rd).glob(glob))
        if hits:
            return hits[0]
        time.sleep(0.02)
    pytest.fail(f"{glob} did not appear in {timeout} s\n{log_tail(rd)}")


def test_two_node_chain_survives_failures(slurm, one_node_chain, tmp_path):
    """The chain with experts, mix and finetune as 2-node jobs (one rank per node), through a
    failed expert task, a preempted 2-node job and a dead node, ends as the one-node run did."""
    ref, _ = one_node_chain
    rd = tmp_path / "run"
    flag = tmp_path / "fail-math"
    hook = tmp_path / "hook.sh"
    # Only array task 1 of the experts job (math) fails, while the flag exists.
    hook.write_text(f'if [ "$SLURM_JOB_NAME" = btx-experts ] && [ "${{SLURM_ARRAY_TASK_ID:-}}" = 1 ] '
                    f'&& [ -e {flag} ]; then echo "injected failure" >&2; exit 3; fi\n')
    flag.touch()
    setup = f"cluster.setup=['. {hook}']"
    start = time.monotonic()

    # 1. A failed expert task, and a preemption (TERM) of the code expert's 2-node job.
    launch(slurm, rd, TWO_NODES, setup)
    first = jobs_of(rd)
    # A second chain in the same run directory is refused while the first is queued.
    proc = launch(slurm, rd, TWO_NODES, setup, check=False)
    assert proc.returncode == 1 and "still queued or running" in proc.stderr, proc.stderr
    wait_path(rd, "experts/code/checkpoints/step-000002")
    subprocess.run(["scancel", "--signal=TERM", "--batch", f"{first['experts']['id']}_0"], env=slurm,
                   capture_output=True, timeout=60)
    wait_for(slurm, rd, timeout=120, until=lambda: any(
        e["unit"] == "experts:code" and e["event"] == "requeue" for e in events(rd)))
    # Every rank checkpointed at the stop step (the marker is written once all shards are in).
    stopped = check_checkpoints(rd / "experts" / "code" / "checkpoints")[-1]
    wait_for(slurm, rd)
    # The ranks exit 75 after the checkpoint; torchrun reports a failed child (1) and srun, which
    # got the TERM too, 143: the job script requeues because it was told to stop.
    code = [(e["event"], e["rc"] != 0 if e["rc"] is not None else None, e["restart"])
            for e in events(rd) if e["unit"] == "experts:code"]
    assert code == [("start", None, 0), ("requeue", True, 0), ("start", None, 1), ("end", False, 1)], log_tail(rd)
    log = (rd / "slurm" / "logs" / f"btx-experts-{first['experts']['id']}_0.out").read_text()
    assert f"stop requested: checkpoint at step {int(stopped.name[len('step-'):])} saved" in log, log[-3000:]
    assert resumed_from(rd, f"btx-experts-{first['experts']['id']}_0.out") == stopped.name, log_tail(rd)
    experts = {d: rd / "experts" / d / "manifest.json" for d in ("code", "math", "wiki")}
    assert experts["code"].is_file() and experts["wiki"].is_file() and not experts["math"].is_file()
    # Nothing downstream of the experts started, Slurm cancelled it (dependency never
    # satisfied), except the report: it runs after the evaluations however they ended
    # (afterany) and names what is missing. The seed's evaluation waits only for the seed: it ran.
    assert {e["unit"] for e in events(rd) if e["unit"].startswith(("eval", "report"))} == {"eval:seed", "report"}
    assert {e["unit"].split(":")[0] for e in events(rd)} == {"tokenizer", "data", "seed", "branch", "experts",
                                                              "eval", "report"}
    assert not {"eval-experts", "eval-dense"} & set(first)  # not in eval.models
    for job in ("mix", "finetune", "dense", "eval-finetune"):
        assert cancelled(slurm, first[job]["id"]), job
    report = json.loads((rd / "report" / "report.json").read_text())
    assert any("btx" in m for m in report["missing"]), report["missing"]
    mtimes = {d: experts[d].stat().st_mtime_ns for d in ("code", "wiki")}
    n_events = len(events(rd))

    # 2. The failed expert is retrained alone; node 2 dies while finetune (2 nodes) saves a
    # checkpoint. Without --requeue the job fails (NODE_FAIL) and the chain stops there.
    flag.unlink()
    launch(slurm, rd, TWO_NODES, setup, "cluster.requeue=false")
    second = jobs_of(rd)
    assert second["experts"]["array"] == "1" and second["experts"]["units"] == ["experts:math"]
    assert not {"data", "seed", "branch", "eval-seed"} & set(second)
    checkpoints = rd / "btx" / "finetuned" / "checkpoints"
    wait_path(rd, "btx/finetuned/checkpoints/step-000002")
    wait_path(rd, "btx/finetuned/checkpoints/.step-*.tmp")  # the next save has begun
    cluster(slurm, "kill-node", "2")
    wait_for(slurm, rd, timeout=240)
    out = subprocess.run(["scontrol", "show", "job", second["finetune"]["id"]], env=slurm, capture_output=True,
                         text=True, timeout=60).stdout
    assert "JobState=NODE_FAIL" in out, out
    assert cancelled(slurm, second["eval-finetune"]["id"])
    assert not (rd / "btx" / "finetuned" / "manifest.json").exists()
    last = check_checkpoints(checkpoints)[-1]  # the killed save left nothing that looks complete
    assert {d: experts[d].stat().st_mtime_ns for d in ("code", "wiki")} == mtimes
    again = [e for e in events(rd)[n_events:] if e["unit"].startswith("experts:")]
    assert {e["unit"] for e in again} == {"experts:math"}

    # 3. The node returns; a relaunch resumes finetune from its last complete checkpoint.
    cluster(slurm, "start-node", "2")
    launch(slurm, rd, TWO_NODES)
    third = jobs_of(rd)
    assert "experts" not in third and "mix" not in third and third["finetune"]["units"] == ["finetune"]
    wait_for(slurm, rd)
    assert (rd / "report" / "report.json").is_file(), log_tail(rd)
    assert resumed_from(rd, f"btx-finetune-{third['finetune']['id']}.out") == last.name, log_tail(rd)
    took = time.monotonic() - start

    # Ranks on both hosts in every 2-node job; the same results as the one-node run.
    for job in ("btx-experts-*", "btx-mix-*", "btx-finetune-*"):
        hosts = rank_hosts(rd, job)
        assert hosts and all(h == ["0=btxn1", "1=btxn2"] or h == ["0=btxn2", "1=btxn1"] for h in hosts), (job, hosts)
        one = rank_hosts(ref, job)  # the reference: both ranks of a job on one host
        assert one and all(len({x.split("=")[1] for x in h}) == 1 for h in one), (job, one)
    check_checkpoints(checkpoints)
    same_results(rd, ref)
    print(f"two-node chain with a failed task, a preemption and a dead node: {took:.0f} s "
          f"(the one-node chain: {one_node_chain[1]:.0f} s)")


@pytest.mark.parametrize("sig", ["USR1"])
def test_job_requeues_before_time_limit(slurm, tmp_path, sig):
    """USR1 before the time limit: the stage stops (exit 75), the job requeues and finishes.
    (TERM, a preemption, is sent to a real 2-node training job in
    test_two_node_chain_survives_failures.)

    A stand-in interpreter plays the stage (the training loop's side, which turns both signals
    into a checkpoint and exit 75, is tested in tests/training/test_resume.py): experts:code
    waits for the stop file, which the job script creates on either signal, on its first run.
    """
    rd = tmp_path / "run"
    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/bash\ncase " $* " in *" train-expert domain=code "*) ;; *) exit 0 ;; esac\n'
                    'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then\n'
                    '  for i in $(seq 1 1500); do [ -e "$NEMO_BTX_STOP_FILE" ] && exit 75; sleep 0.2; done\n'
                    '  exit 1\nfi\nexit 0\n')
    fake.chmod(0o755)
    launch(slurm, rd, f"cluster.python={fake}")
    jobs = jobs_of(rd)
    wait_for(slurm, rd, timeout=120, until=lambda: "experts:code" in spans(events(rd)))
    # What sbatch --signal=B:USR1@N does N seconds before the time limit (scancel may report an
    # error when the job requeues before its reply: the events below are what counts).
    subprocess.run(["scancel", f"--signal={sig}", "--batch", f"{jobs['experts']['id']}_0"], env=slurm,
                   capture_output=True, timeout=60)
    wait_for(slurm, rd, timeout=240)
    code = [(e["event"], e["rc"], e["restart"]) for e in events(rd) if e["unit"] == "experts:code"]
    assert code == [("start", None, 0), ("requeue", 75, 0), ("start", None, 1), ("end", 0, 1)], log_tail(rd)
    span = spans(events(rd))
    assert span["report"][2] == 0 and span["mix"][0] >= span["experts:code"][1]
