"""The MoE finetune stage: routing variants, frozen experts, routing analysis, EP=2 parity."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env
from nemo_btx.run_dir import RunDir

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
    from nemo_btx.config import from_yaml

    moe = from_yaml((out / "config.yaml").read_text()).model.moe
    assert (moe.aux_loss_coeff, moe.load_balancing_type) == (0.0, "none")
    assert from_yaml((run_dir / "btx" / "finetuned" / "config.yaml").read_text()).model.moe.aux_loss_coeff == 0.01
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_baselines_match_btx_data_and_compute(run_dir):
    """Budgets come from the ledger: data-matched = BTX's finetune steps; compute-matched =
    (expert FLOPs + BTX finetune FLOPs) / FLOPs per step of the baseline's model."""

    from nemo_btx.config import load_config
    from nemo_btx.model.build import model_flops_per_token
    from nemo_btx.training.budget import btx_flops, read_ledger

    cli(run_dir, "finetune", *FT)  # BTX's MoE stage (skipped if an earlier test ran it)
    # Stand-ins for the earlier stages: a dense seed and an upcycled MoE (random weights), and
    # the ledger lines three experts of 40 steps would have written.
    for out, extra in ((run_dir / "seed" / "weights", []),
                       (RunDir(run_dir).upcycled, ["model.moe.num_experts=4"])):
        if not out.exists():
            proc = subprocess.run([sys.executable, str(REPO / "tests" / "stages" / "make_moe.py"),
                                   str(out), *SMALL, *extra], cwd=REPO, env=clean_env(),
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(SMALL)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    dense_per_step = model_flops_per_token(cfg.model) * tokens_per_step
    if not any("experts" in e["out"] for e in read_ledger(run_dir)):
        with open(run_dir / "ledger.jsonl", "a") as f:
            for d in ("code", "math", "wiki"):
                f.write(json.dumps({"stage": f"expert:{d}", "out": str(run_dir / "experts" / d),
                                    "tokens": 40 * tokens_per_step, "flops": 40 * dense_per_step}) + "\n")
    budget = btx_flops(run_dir)
    finetune_flops = sum(e["flops"] for e in read_ledger(run_dir) if e["out"].endswith("btx/finetuned"))
    assert budget == pytest.approx(120 * dense_per_step + finetune_flops)

    cli(run_dir, "baselines", "baselines.eval_interval=1000", "baselines.save_interval=1000")
    base = RunDir(run_dir).baseline
    data = json.loads((base("upcycle-data") / "manifest.json").read_text())
    compute = json.loads((base("upcycle-compute") / "manifest.json").read_text())
    dense = json.loads((base("dense") / "manifest.json").read_text())
    assert data["steps"] == 6                                   # = BTX finetune steps
    moe_per_step = compute["train_flops_per_token"] * tokens_per_step
    assert compute["steps"] == round(budget / moe_per_step)
    assert dense["steps"] == round(budget / dense_per_step)
    assert dense["steps"] > compute["steps"] > data["steps"]    # dense steps are cheapest
    spent = {e["stage"]: e["flops"] for e in read_ledger(run_dir)}
    assert spent["baseline:upcycle-compute"] == pytest.approx(budget, rel=0.1)
    assert spent["baseline:dense"] == pytest.approx(budget, rel=0.05)
