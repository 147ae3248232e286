"""Runs alone or under torchrun for the mixing tests.

    python mix_worker.py dense OUT key=value ...        random dense model (train.seed) -> OUT
    python mix_worker.py loss CKPT OUT_JSON key=value   eval loss of CKPT at the given layout
    python mix_worker.py mix-hang key=value ...         `nemo-btx mix`, but stop forever just
                                                        before the final rename (kill -9 tests)
"""

import json
import sys


def dense(out, overrides):
    from nemo_btx.config import load_config
    from nemo_btx.model.build import build_model
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training.checkpoint import save_model_weights

    cfg = load_config(overrides)
    init_runtime(cfg)
    chunks = build_model(cfg, wrap_ddp=False)
    save_model_weights(chunks, out, cfg.model)
    shutdown()


def loss(ckpt, out_json, overrides):
    import torch
    from megatron.core import parallel_state

    from nemo_btx.config import load_config
    from nemo_btx.model.build import build_model
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training.batches import rank_microbatches, synthetic_global_batch
    from nemo_btx.training.checkpoint import load_model_weights
    from nemo_btx.training.step import eval_loss

    cfg = load_config(overrides)
    rt = init_runtime(cfg)
    chunks = build_model(cfg, wrap_ddp=False)
    load_model_weights(chunks, ckpt, cfg.model)
    dp_rank = parallel_state.get_data_parallel_rank()
    losses = [eval_loss(cfg, chunks, rank_microbatches(cfg, synthetic_global_batch(cfg, step),
                                                       dp_rank, rt.dp_size, rt.device))
              for step in range(2)]
    if torch.distributed.get_rank() == 0:
        with open(out_json, "w") as f:
            json.dump({"losses": losses, "world_size": rt.world_size}, f)
    shutdown()


def mix_hang(overrides):
    import time

    import nemo_btx.mixing.write as write
    from nemo_btx.cli import main

    class _Hang:
        @staticmethod
        def replace(*_args):
            print("READY-TO-RENAME", flush=True)
            time.sleep(3600)

    write.os = _Hang  # the rename is the commit point: never reach it
    return main(["mix", *overrides])


if __name__ == "__main__":  # the checkpoint writer's spawn manager re-imports __main__
    from nemo_btx.log import init_logger

    init_logger("WARNING")
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "dense":
        dense(rest[0], rest[1:])
    elif cmd == "loss":
        loss(rest[0], rest[1], rest[2:])
    elif cmd == "mix-hang":
        sys.exit(mix_hang(rest))
    else:
        raise SystemExit(f"unknown command {cmd}")
