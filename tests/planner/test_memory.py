"""The planner's weights, gradients and optimizer bytes against what torch allocates.

memory_worker.py builds the tiny dense and MoE models with their optimizer exactly as training
does, takes a step, and sums the storages; the planner (nemo_btx/planner/memory.py) predicts
the same three figures from the config alone. Within 5 % on every rank, at 1 and 2 ranks,
fp32 and bf16, with and without the distributed optimizer (the difference is megatron's buffer
padding). The distributed optimizer's sharding is checked too: its state shrinks with DP.
"""

import json

import pytest

from conftest import REPO
from nemo_btx.config import load_config
from nemo_btx.planner.memory import Layout, state_bytes
from nemo_btx.planner.params import rank_params

WORKER = REPO / "tests" / "planner" / "memory_worker.py"
SMALL = ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=352",
         "model.vocab_size=2048", "model.seq_length=32", "train.micro_batch_size=2",
         "train.global_batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_state_bytes_within_5_percent_of_torch(tmp_path, torchrun, nproc):
    out = tmp_path / "mem.json"
    torchrun(WORKER, [out, *SMALL], nproc=nproc, timeout=400)
    rows = [r for rank in range(nproc) for r in json.loads((tmp_path / f"mem.json.{rank}").read_text())]
    assert len(rows) == 8 * nproc
    for r in rows:
        cfg = load_config(r["overrides"])
        params = rank_params(cfg.model, cfg.parallel, r["pp_rank"])
        assert params.total == r["params"], r
        want = state_bytes(params, Layout.of(cfg.parallel, r["world"]), r["precision"],
                           cfg.parallel.distributed_optimizer)
        for part in ("weights", "gradients", "optimizer"):
            assert abs(r[part] - want[part]) <= 0.05 * want[part], (part, r[part], want[part], r)
    if nproc == 2:  # the distributed optimizer halves the dense model's optimizer state at DP=2
        dense = {(r["precision"], r["do"]): r["optimizer"] for r in rows if r["model"] == "dense" and r["rank"] == 0}
        for precision in ("fp32", "bf16"):
            assert dense[(precision, True)] < 0.55 * dense[(precision, False)], dense
