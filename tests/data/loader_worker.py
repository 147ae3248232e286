"""Builds TrainData and validation batches in one process (plain, or a torchrun rank) and writes
a digest of what it read, so tests can compare processes that built the caches concurrently."""

import hashlib
import json
import os
import sys

import torch


def main(run_dir: str, out: str, *overrides: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from data_fixtures import small_config
    from nemo_btx.data.loader import TrainData, validation_batches

    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    cfg = small_config(run_dir, *overrides)
    td = TrainData(cfg, run_dir, ["code", "math", "wiki"], [0.5, 0.25, 0.25])
    digest = hashlib.sha256()
    for step in (0, 7, cfg.train.train_iters - 1):
        digest.update(td.global_batch(step).numpy().tobytes())
    for batch in validation_batches(cfg, run_dir, "wiki", 2):
        digest.update(batch.numpy().tobytes())
    rank = os.environ.get("RANK", str(os.getpid()))
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"digest": digest.hexdigest(), "dist": torch.distributed.is_initialized()}, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
