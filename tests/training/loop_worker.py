"""Runs the real training loop on the synthetic Markov data (no data stage needed).

    python loop_worker.py OUT_DIR key=value ...        (or under torchrun)

Used by the resume tests: a run killed with SIGKILL and started again must end exactly where
an uninterrupted run ends.
"""

import sys
from pathlib import Path

from nemo_btx.config import load_config
from nemo_btx.log import init_logger


def main(out_dir, overrides):
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training.batches import synthetic_global_batch
    from nemo_btx.training.loop import TrainJob, run_training, stage_config

    cfg = load_config(overrides)
    cfg = stage_config(cfg, cfg.job, cfg.train.train_iters)
    rt = init_runtime(cfg)
    valid = {"synthetic": [synthetic_global_batch(cfg, 1_000_000)]}
    job = TrainJob(name="train", out_dir=Path(out_dir), domains=["synthetic"], stage=cfg.job,
                   eval_domains=["synthetic"])
    run_training(cfg, job, rt, lambda step: synthetic_global_batch(cfg, step), valid)
    shutdown()


if __name__ == "__main__":
    init_logger("INFO")
    main(sys.argv[1], sys.argv[2:])
