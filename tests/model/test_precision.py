"""bf16 (the GPU recipe) is reachable by config and trains; fp32 is the CPU default."""

import subprocess
import sys
import json

import pytest

from conftest import REPO, clean_env


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_bf16_mixed_precision_trains_with_fp32_main_weights(tmp_path):
    script = r'''
import json, sys, torch
from nemo_btx.config import load_config
from nemo_btx.model.build import build_model, unwrap
from nemo_btx.runtime.distributed import init_runtime, shutdown
from nemo_btx.training.batches import rank_microbatches, synthetic_global_batch
from nemo_btx.training.step import attach_megatron_hooks, build_optimizer, train_step
cfg = load_config(["train.precision=bf16", "model.num_layers=2", "model.hidden_size=64",
    "model.ffn_hidden_size=128", "model.vocab_size=256", "model.seq_length=32",
    "train.micro_batch_size=4", "train.global_batch_size=8", "train.lr=3e-3", "train.train_iters=8",
    "model.moe.num_experts=4"])
rt = init_runtime(cfg)
chunks = build_model(cfg)
opt, sched = build_optimizer(cfg, chunks)
attach_megatron_hooks(chunks, opt)
dtypes = sorted({str(p.dtype) for p in unwrap(chunks[0]).parameters()})
main = sorted({str(p.dtype) for g in opt.param_groups for p in g["params"]})
losses = [train_step(cfg, chunks, opt, sched, rank_microbatches(cfg, synthetic_global_batch(cfg, i), 0, 1, rt.device)).loss for i in range(8)]
json.dump({"dtypes": dtypes, "main": main, "losses": losses, "wrapper": type(chunks[0].module).__name__}, open(sys.argv[1], "w"))
shutdown()
'''
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dtypes"] == ["torch.bfloat16"]
    assert r["main"] == ["torch.float32"]  # the optimizer steps fp32 copies
    assert r["wrapper"] == "Float16Module"
    assert r["losses"][-1] < r["losses"][0] - 0.05, r["losses"]
