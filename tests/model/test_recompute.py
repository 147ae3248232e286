"""parallel.recompute (selective: the core attention; full: every layer) changes memory, not
results: the losses of a few training steps equal those without recomputation, dense and MoE."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, clean_env

SCRIPT = r'''
import json, sys
from megatron.core import parallel_state
from nemo_btx.config import load_config
from nemo_btx.model.build import build_model, transformer_config, unwrap
from nemo_btx.runtime.distributed import init_runtime, shutdown
from nemo_btx.training.batches import rank_microbatches, synthetic_global_batch
from nemo_btx.training.step import attach_megatron_hooks, build_optimizer, train_step
out = {}
for model in (["model.moe.num_experts=4"], []):
    for rc in ("none", "selective", "full"):
        cfg = load_config(["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
            "model.vocab_size=256", "model.seq_length=32", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.lr=3e-3", "train.train_iters=4",
            f"parallel.recompute={rc}", *model])
        rt = init_runtime(cfg)
        tc = transformer_config(cfg)
        chunks = build_model(cfg)
        opt, sched = build_optimizer(cfg, chunks)
        attach_megatron_hooks(chunks, opt)
        calls = []  # forwards of the first layer's core attention: recomputation runs it again
        unwrap(chunks[0]).decoder.layers[0].self_attention.core_attention.register_forward_pre_hook(
            lambda *a: calls.append(1))
        losses = [train_step(cfg, chunks, opt, sched, rank_microbatches(cfg, synthetic_global_batch(cfg, i),
                                                                       0, 1, rt.device)).loss for i in range(4)]
        out[f"{'moe' if model else 'dense'}-{rc}"] = {"losses": losses, "granularity": tc.recompute_granularity,
                                                           "calls": len(calls)}
        parallel_state.destroy_model_parallel()
shutdown()
json.dump(out, open(sys.argv[1], "w"))
'''


@pytest.mark.timeout(300)
def test_recompute_gives_the_same_losses(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for model in ("dense", "moe"):
        assert r[f"{model}-none"]["granularity"] is None
        assert r[f"{model}-none"]["calls"] == 8  # 4 steps x 2 micro-batches
        for rc in ("selective", "full"):
            assert r[f"{model}-{rc}"]["granularity"] == rc
            assert r[f"{model}-{rc}"]["calls"] == 16  # every forward ran again for the backward
            assert r[f"{model}-{rc}"]["losses"] == r[f"{model}-none"]["losses"], (model, rc, r)
