"""Runs under torchrun (or alone): train a few steps from given weights and record the losses.

    python tests/distributed/worker.py OUT_JSON CKPT_DIR save|load key=value ...

`save` builds the model from the seed and writes its weights to CKPT_DIR first (the single-
process reference); `load` reads them at whatever layout the overrides describe. Both then run
the same global batches, so every layout must reproduce the reference losses.
"""

import json
import sys

from nemo_btx.config import load_config
from nemo_btx.log import init_logger


def main(out_json: str, ckpt: str, mode: str, overrides):
    import torch
    from megatron.core import parallel_state

    from nemo_btx.model.build import build_model
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training.batches import rank_microbatches, synthetic_global_batch
    from nemo_btx.training.checkpoint import load_model_weights, save_model_weights
    from nemo_btx.training.step import attach_megatron_hooks, build_optimizer, train_step

    cfg = load_config(overrides)
    rt = init_runtime(cfg)
    chunks = build_model(cfg)
    if mode == "save":
        save_model_weights(chunks, ckpt, cfg.model)
    else:
        load_model_weights(chunks, ckpt, cfg.model)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    attach_megatron_hooks(chunks, optimizer)
    losses, norms = [], []
    dp_rank = parallel_state.get_data_parallel_rank()
    for step in range(cfg.train.train_iters):
        micro = rank_microbatches(cfg, synthetic_global_batch(cfg, step), dp_rank, rt.dp_size, rt.device)
        r = train_step(cfg, chunks, optimizer, scheduler, micro)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    if torch.distributed.get_rank() == 0:
        with open(out_json, "w") as f:
            json.dump({"losses": losses, "grad_norms": norms, "world_size": rt.world_size}, f)
    shutdown()


if __name__ == "__main__":  # the checkpoint writer's spawn manager re-imports __main__
    init_logger("WARNING")
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
