"""Kill -9 at a random step, start again: the result equals a run that was never killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, clean_env, replay_hint, run_torchrun

WORKER = REPO / "tests" / "training" / "loop_worker.py"
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.vocab_size=256", "model.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.train_iters=12", "train.warmup_iters=2",
        "train.lr=3e-3", "job.save_interval=3", "job.eval_interval=4", "job.keep_checkpoints=2"]


def losses(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs], [r["valid"]["synthetic"] for r in recs if "valid" in r]


def read_tensors(path):
    from nemo_btx.training.checkpoint import read_tensors

    return read_tensors(path)


def weights(out):
    return read_tensors(out / "weights")


def run(out, extra=(), nproc=None):
    if nproc:
        return run_torchrun(WORKER, [out, *TINY, *extra], nproc=nproc)
    proc = subprocess.run([sys.executable, str(WORKER), str(out), *TINY, *extra], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def kill_at(out, step, extra=()):
    """Start a run and SIGKILL it once metrics.jsonl shows `step` finished steps."""
    # Own session: the SIGKILL goes to the whole process group (as Slurm kills a job step),
    # including megatron's checkpoint-writer helper processes.
    proc = subprocess.Popen([sys.executable, str(WORKER), str(out), *TINY, *extra], cwd=REPO,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(out)
    return out


def test_metrics_record_throughput_and_memory(uninterrupted):
    """Every step logs tokens/s per device and peak memory (on CPU: peak RSS; MFU only on GPU,
    where cluster.gpu_peak_tflops means something)."""
    recs = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 12
    for r in recs:
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"])  # one process
        assert 0.1 < r["peak_memory_gb"] < 8 and "mfu" not in r
    # What the model ran on is in its checkpoints' markers (on CPU: megatron-core's local layers).
    marker = json.loads((uninterrupted / "weights" / "btx_checkpoint.json").read_text())
    assert marker["kernels"]["spec"] == "local" and marker["kernels"]["grouped_gemm"] is False


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wandb_offline_logs_every_step(tmp_path):
    """logging.wandb=true: every step also goes to a Weights & Biases run (offline mode here: the
    run is written under the stage's directory), named after the stage, with the final losses."""
    env = clean_env(WANDB_MODE="offline", WANDB_SILENT="true")
    extra = ["logging.wandb=true", "train.train_iters=4", "job.save_interval=4", "job.eval_interval=4"]
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path), *TINY, *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (log,) = run.glob("run-*.wandb")  # the offline run's record log: its values are JSON text
    raw = log.read_bytes()
    assert b"train/loss" in raw and b"valid/synthetic_loss" in raw and b"train/peak_memory_gb" in raw
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for r in records:  # every step's loss, as W&B encodes it
        assert json.dumps(r["loss"]).encode() in raw, r["step"]
    assert json.dumps(records[-1]["valid"]["synthetic"]).encode() in raw


@pytest.mark.timeout(600)
def test_kill9_then_resume_equals_uninterrupted(uninterrupted, tmp_path, test_rng):
    step = test_rng.randint(2, 10)
    killed = f"killed at step {step} ({replay_hint()})"
    print(killed)
    kill_at(tmp_path, step)
    run(tmp_path)
    ref_train, ref_valid = losses(uninterrupted)
    got_train, got_valid = losses(tmp_path)
    assert got_train == ref_train, killed
    assert got_valid == ref_valid, killed
    a, b = weights(uninterrupted), weights(tmp_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs: {killed}"
    ledger = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert ledger[-1]["steps"] == [0, 12] and ledger[-1]["segment"]["steps"][1] == 12
    ref_ledger = json.loads((uninterrupted / "ledger.jsonl").read_text().splitlines()[-1])
    assert ledger[-1]["tokens"] == ref_ledger["tokens"] and ledger[-1]["flops"] == ref_ledger["flops"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_resume_at_another_layout(uninterrupted, tmp_path):
    """Saved at 1 process, resumed at TP=2 (2 processes): the same remaining losses."""
    kill_at(tmp_path, 7)  # checkpoint at step 6 exists
    run(tmp_path, ["parallel.tp=2"], nproc=2)
    ref, _ = losses(uninterrupted)
    got, _ = losses(tmp_path)
    assert len(got) == len(ref) == 12
    for a, b in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-5)


def test_incomplete_checkpoint_is_never_loaded(tmp_path):
    from nemo_btx.training import checkpoint as ckpt
    from nemo_btx.errors import CheckpointError

    root = tmp_path / "checkpoints"
    (root / "step-000003").mkdir(parents=True)            # written, never marked
    (root / ".step-000006.tmp").mkdir()                   # killed mid-save
    assert ckpt.latest_checkpoint(root) is None
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        ckpt.read_marker(root / "step-000003")
    ckpt.clean_incomplete(root)
    assert list(root.iterdir()) == []


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_distributed_optimizer_resume_at_dp2(tmp_path):
    """Distributed optimizer (state sharded over DP=2): resuming from a mid-run checkpoint
    reproduces the uninterrupted run, so its sharded state round-trips through the checkpoint
    (this caught megatron sharing one Adam `step` tensor across parameters after a load)."""
    import shutil

    extra = ["parallel.distributed_optimizer=true", "model.moe.num_experts=4"]
    run(tmp_path, extra, nproc=2)
    first, _ = losses(tmp_path)
    final = weights(tmp_path)
    # Roll the run back to its step-9 checkpoint, as if it had died after saving it.
    shutil.rmtree(tmp_path / "checkpoints" / "step-000012")
    shutil.rmtree(tmp_path / "weights")
    (tmp_path / "manifest.json").unlink()
    # Necessity of runtime/cpu.py's torch_adam_step_state: without it this resume breaks.
    with pytest.raises(AssertionError, match=r"KeyError: 'step'|assert len\(steps\) == 1"):
        run_torchrun(WORKER, [tmp_path, *TINY, *extra], nproc=2,
                     env=clean_env(NEMO_BTX_CPU_SKIP="torch_adam_step_state"))
    run(tmp_path, extra, nproc=2)
    again, _ = losses(tmp_path)
    assert again == first
    resumed = weights(tmp_path)
    for key in final:
        assert torch.equal(final[key], resumed[key]), key
    # Overlapped communication (gradient buckets reduced during the backward, updated parameter
    # shards gathered during the next forward): the same losses, and the same tensors in a
    # mid-run checkpoint (model and optimizer) and in the final weights, which are saved
    # between a step and the forward that would have gathered them.
    overlap = tmp_path / "overlap"
    run(overlap, [*extra, "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"],
        nproc=2)
    assert losses(overlap)[0] == first
    step9 = "checkpoints/step-000009"
    plain, overlapped = read_tensors(tmp_path / step9), read_tensors(overlap / step9)
    assert plain.keys() == overlapped.keys()
    for key in plain:
        assert torch.equal(plain[key], overlapped[key]), key
    got = weights(overlap)
    for key in final:
        assert torch.equal(final[key], got[key]), key


@pytest.mark.slow
@pytest.mark.timeout(600)
# TERM (a preemption) takes the same path as USR1 in the loop; it is tested end to end on a
# 2-node Slurm job (tests/slurm: both ranks checkpoint, the job requeues and resumes).
@pytest.mark.parametrize("sig,extra", [(signal.SIGUSR1, []), (signal.SIGUSR1, ["train.async_save=true"])],
                         ids=["USR1", "USR1-async-save"])
def test_stop_signal_checkpoints_exits_75_and_resumes_exactly(uninterrupted, tmp_path, sig, extra):
    """Slurm's warning before a time limit (USR1) or a preemption (TERM): the loop saves a
    checkpoint at the next step, exits with 75 (the job script requeues on it), and the
    requeued run ends exactly like an uninterrupted one. With train.async_save the checkpoints
    are written in the background (published at a later step, or before the exit)."""
    proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), *TINY, *extra], cwd=REPO,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-3000:]
    assert not (tmp_path / "manifest.json").exists()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("."))
    stopped_at = len(metrics.read_text().splitlines())
    assert saved[-1] == f"step-{stopped_at:06d}" and stopped_at < 12, saved
    assert all((tmp_path / "checkpoints" / d / "btx_checkpoint.json").is_file() for d in saved)
    run(tmp_path, extra)
    assert losses(tmp_path) == losses(uninterrupted)
    a, b = weights(uninterrupted), weights(tmp_path)
    for key in a:
        assert torch.equal(a[key], b[key]), key
