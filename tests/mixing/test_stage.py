"""The stages in a run directory: default paths, router_init=data from the run's held-out
data, upcycling, and skip-if-complete. (In this process; the stages start their own runtime.)"""

import json

import pytest
import torch

from nemo_btx.config import load_config
from nemo_btx.training.checkpoint import read_tensors

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.vocab_size=512", "model.seq_length=32",
        "train.micro_batch_size=2", "train.global_batch_size=4", "data.max_chars_per_domain=100000"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Data for the three builtin domains, and dense seed + expert weights where the stages
    put them (random models stand in for trained ones)."""
    from nemo_btx.model.build import build_model
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.stages import data
    from nemo_btx.training.checkpoint import save_model_weights

    run = tmp_path_factory.mktemp("stage") / "run"
    cfg = load_config(TINY + [f"run.dir={run}"])
    data.run(cfg)
    init_runtime(cfg)
    try:
        targets = [run / "seed" / "weights"] + [run / "experts" / d / "weights"
                                                  for d in ("code", "math", "wiki")]
        for seed, target in enumerate(targets):
            torch.manual_seed(seed)
            save_model_weights(build_model(cfg, wrap_ddp=False), target, cfg.model)
    finally:
        shutdown()
    return run


def test_mix_stage_with_data_router_then_skip(run_dir, caplog):
    from nemo_btx.stages import mix

    cfg = load_config(TINY + [f"run.dir={run_dir}", "mix.router_init=data", "mix.router_init_batches=1"])
    mix.run(cfg)
    out = run_dir / "btx" / "mixed"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "mix" and manifest["moe"]["num_experts"] == 4
    assert [s["name"] for s in manifest["sources"]] == ["code", "math", "wiki", "seed"]
    assert manifest["sources"][3]["domains"] == ["code", "math", "wiki"]
    router = read_tensors(out)["decoder.layers.mlp.router.weight"]
    assert torch.allclose(router.norm(dim=-1), torch.ones(2, 4), atol=1e-5)  # unit mean states
    assert not torch.allclose(router[:, 0], router[:, 1])
    mtime = (out / "manifest.json").stat().st_mtime
    with caplog.at_level("INFO"):
        mix.run(cfg)  # complete: skipped
    assert "skipping" in caplog.text and (out / "manifest.json").stat().st_mtime == mtime


def test_upcycle_stage(run_dir):
    from nemo_btx.stages import upcycle

    from nemo_btx.run_dir import RunDir

    upcycle.run(load_config(TINY + [f"run.dir={run_dir}"]))
    out = RunDir(run_dir).upcycled  # <run.dir>/baselines/upcycled
    assert out == run_dir / "baselines" / "upcycled"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "upcycle" and manifest["moe"]["num_experts"] == 4  # domains + 1
    marker = json.loads((out / "btx_checkpoint.json").read_text())
    assert marker["model"]["moe"]["num_experts"] == 4
