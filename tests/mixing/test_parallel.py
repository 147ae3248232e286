"""The mixed MoE at other layouts (torchrun, 2 gloo processes).

(c) the EP=1 mix loads at EP=2, TP=2 and PP=2 and gives the single-process losses;
(d) the mix itself run at EP=2 (and TP=2, and TP=2 x EP=2 with expert-TP 1) writes the same
    tensors, bit for bit, as at EP=1.
"""

import json

import pytest
import torch

from mixhelpers import REPO, SMALL, experts_override, make_dense, run_mix, run_torchrun, runtime  # noqa: F401
from nemo_btx.config import load_config
from nemo_btx.training.checkpoint import read_tensors

WORKER = REPO / "tests" / "mixing" / "mix_worker.py"
DOMAINS = "data.domains=[{name: code}, {name: math}, {name: wiki}]"
MOE = ["model.moe.num_experts=4"]


@pytest.fixture(scope="module")
def mixed(runtime, tmp_path_factory):
    """3 experts + the seed mixed at EP=1 in this process, and its losses on two batches."""
    from nemo_btx.model.build import build_model
    from nemo_btx.training.batches import rank_microbatches, synthetic_global_batch
    from nemo_btx.training.checkpoint import load_model_weights
    from nemo_btx.training.step import eval_loss

    d = tmp_path_factory.mktemp("parallel")
    paths = [make_dense(d / n, s) for n, s in (("code", 1), ("math", 2), ("wiki", 3), ("seed", 4))]
    args = [experts_override(paths[:3]), f"mix.seed_checkpoint={paths[3]}", DOMAINS]
    run_mix(args + [f"mix.out={d / 'ep1'}"])
    cfg = load_config(SMALL + MOE)
    chunks = build_model(cfg, wrap_ddp=False)
    load_model_weights(chunks, d / "ep1", cfg.model)
    losses = [eval_loss(cfg, chunks, rank_microbatches(cfg, synthetic_global_batch(cfg, step), 0, 1,
                                                       torch.device("cpu"))) for step in range(2)]
    return d, args, losses


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", ["parallel.ep=2", "parallel.tp=2", "parallel.pp=2"])
@pytest.mark.slow
def test_mixed_checkpoint_loads_at_other_layouts(mixed, tmp_path, layout):
    d, _, ref = mixed
    out = tmp_path / "loss.json"
    run_torchrun(WORKER, ["loss", d / "ep1", out, *SMALL, *MOE, layout], nproc=2)
    got = json.loads(out.read_text())
    assert got["world_size"] == 2
    for a, b in zip(got["losses"], ref):
        assert a == pytest.approx(b, rel=1e-6), f"{layout}: {a} vs single process {b}"


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", ["parallel.ep=2", "parallel.tp=2",
                                    "parallel.tp=2 parallel.ep=2 parallel.etp=1"])
@pytest.mark.slow
def test_mix_at_another_layout_is_bitwise_identical(mixed, tmp_path, layout):
    d, args, _ = mixed
    out = tmp_path / "moe"
    # (the CLI checks parallel.ep against model.moe.num_experts before the stage derives it)
    run_torchrun("-m", ["nemo_btx.cli", "mix", *SMALL, *MOE, *args, f"mix.out={out}",
                        *layout.split()], nproc=2)
    ref, got = read_tensors(d / "ep1"), read_tensors(out)
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"]["world_size"] == 2 and len(manifest["ranks"]) == 2
    written = [r["bytes_written"] for r in manifest["ranks"]]
    assert min(written) > 0.4 * max(written), f"unbalanced writers: {written}"
