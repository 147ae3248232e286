"""Helpers for the mixing tests: an in-process runtime fixture and tiny random dense checkpoints.

(Not a conftest.py: the suite's `from conftest import ...` must keep meaning tests/conftest.py.)
"""

import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, clean_env, run_torchrun  # noqa: F401  (re-exported)
from nemo_btx.config import load_config

#: A tiny Llama-style model (SwiGLU, RMSNorm, RoPE); 2 layers so PP=2 works.
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.vocab_size=256", "model.seq_length=32",
         "train.micro_batch_size=2", "train.global_batch_size=4"]


@pytest.fixture(scope="module")
def runtime():
    """One single-process runtime per test module (mixing is collective even on one rank)."""
    from nemo_btx.runtime.distributed import init_runtime, shutdown

    rt = init_runtime(load_config(SMALL))
    yield rt
    shutdown()


def make_dense(path: Path, seed: int, overrides=(), poison=None, value=float("nan")) -> Path:
    """A random dense checkpoint; norms are perturbed too, so averages are not trivially 1."""
    from nemo_btx.model.build import build_model
    from nemo_btx.training.checkpoint import save_model_weights

    cfg = load_config(SMALL + list(overrides))
    torch.manual_seed(seed)
    (model,) = build_model(cfg, wrap_ddp=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        if poison is not None:
            dict(model.named_parameters())[poison].view(-1)[3] = value
    save_model_weights([model], path, cfg.model)
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_mix(overrides, kind: str = "mix", batches_for=None):
    """The converter in this process (the runtime fixture must be active); returns the plan."""
    from nemo_btx.mixing.convert import mix_checkpoint
    from nemo_btx.mixing.job import prepare
    from nemo_btx.mixing.plan import plan_mix, plan_upcycle

    cfg = load_config(SMALL + list(overrides))
    plan = (plan_mix if kind == "mix" else plan_upcycle)(cfg)
    moe_cfg = prepare(cfg, plan)
    assert moe_cfg is not None, "output unexpectedly complete"
    mix_checkpoint(moe_cfg, plan, batches_for=batches_for)
    return plan, moe_cfg


def experts_override(paths) -> str:
    return "mix.experts=[" + ",".join(str(p) for p in paths) + "]"
