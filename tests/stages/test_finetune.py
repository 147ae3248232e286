"""The MoE finetune stage: routing variants, frozen experts, routing analysis, EP=2 parity."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env, run_torchrun

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.vocab_size=512", "model.seq_length=64",
         "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3",
         "data.max_chars_per_domain=150000", "data.eval_iters=1"]
FT = ["finetune.train_iters=6", "finetune.eval_interval=3", "finetune.save_interval=3",
      "train.warmup_iters=1"]


def cli(run_dir, *args, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", args[0], f"run.dir={run_dir}",
                           *SMALL, *args[1:]], cwd=REPO, env=env or clean_env(),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rd = tmp_path_factory.mktemp("ft")
    cli(rd, "data")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "stages" / "make_moe.py"),
                           str(rd / "btx" / "mixed"), *SMALL, "model.moe.num_experts=4"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rd


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_top2_finetune_trains_and_records_routing(run_dir):
    cli(run_dir, "finetune", *FT)
    out = run_dir / "btx" / "finetuned"
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    routing = json.loads((out / "routing.json").read_text())
    assert routing["router_topk"] == 2 and routing["num_experts"] == 4
    assert set(routing["fractions"]) == {"code", "math", "wiki"}
    for domain, layers in routing["fractions"].items():
        assert set(layers) == {"1", "2"}
        for shares in layers.values():
            assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-9
    ledger = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert ledger[-1]["stage"] == "finetune" and ledger[-1]["flops"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_frozen_experts_stay_bit_identical(run_dir):
    from nemo_btx.training.checkpoint import read_tensors

    out = run_dir / "frozen"
    cli(run_dir, "finetune", *FT, "finetune.freeze_experts=true", f"finetune.out={out}")
    before, after = read_tensors(run_dir / "btx" / "mixed"), read_tensors(out / "weights")
    experts = [k for k in before if ".experts." in k]
    others = [k for k in before if ".experts." not in k]
    assert experts and others
    for k in experts:
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in others if not torch.equal(before[k], after[k])]
    assert any("router" in k for k in changed) and any("self_attention" in k for k in changed)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_switch_and_soft_routing_and_no_load_balancing(run_dir):
    for variant, topk in (("switch", 1), ("soft", 4)):
        out = run_dir / variant
        cli(run_dir, "finetune", *FT, f"finetune.routing={variant}", f"finetune.out={out}")
        assert json.loads((out / "routing.json").read_text())["router_topk"] == topk
        assert metrics(out)[-1]["loss"] < metrics(out)[0]["loss"]
    out = run_dir / "nolb"
    cli(run_dir, "finetune", *FT, "finetune.load_balancing=false", f"finetune.out={out}")
    assert "model.moe.aux_loss_coeff: 0.0" in (out / "config.yaml").read_text().replace(
        "aux_loss_coeff: 0.0", "model.moe.aux_loss_coeff: 0.0")
    proc = cli(run_dir, "finetune", "finetune.routing=sample_top1", "finetune.out=/nonexistent",
               check=False)
    assert proc.returncode == 2 and "finetune.routing='sample_top1'" in proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_ep2_finetune_reproduces_ep1(run_dir):
    cli(run_dir, "finetune", *FT, f"finetune.out={run_dir / 'ep1'}")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29000 + hash(str(run_dir)) % 2000), "-m", "nemo_btx.cli",
         "finetune", f"run.dir={run_dir}", *SMALL, *FT, "parallel.ep=2",
         f"finetune.out={run_dir / 'ep2'}"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = [m["loss"] for m in metrics(run_dir / "ep1")]
    b = [m["loss"] for m in metrics(run_dir / "ep2")]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5)
