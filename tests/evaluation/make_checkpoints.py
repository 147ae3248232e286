"""Random-weight checkpoints for the evaluation tests, in a run directory with data and a seed:
three dense "experts" (different init seeds) and a 4-expert top-2 MoE of the same size.

    python make_checkpoints.py RUN_DIR key=value ...   (the run's config overrides)
"""

import sys
from pathlib import Path

import torch

from nemo_btx.config import load_config
from nemo_btx.model.build import build_model
from nemo_btx.runtime.distributed import init_runtime, shutdown
from nemo_btx.training.checkpoint import save_model_weights


def main(run_dir: str, *overrides: str) -> None:
    cfg = load_config([f"run.dir={run_dir}", *overrides])
    init_runtime(cfg)
    try:
        for i, domain in enumerate(["code", "math", "wiki"]):
            torch.manual_seed(100 + i)
            chunks = build_model(cfg, wrap_ddp=False)
            save_model_weights(chunks, Path(run_dir) / "experts" / domain / "weights", cfg.model,
                               extra={"stage": "test-expert"})
        moe_cfg = load_config([f"run.dir={run_dir}", *overrides, "model.moe.num_experts=4",
                               "model.moe.router_topk=2"])
        torch.manual_seed(200)
        chunks = build_model(moe_cfg, wrap_ddp=False)
        save_model_weights(chunks, Path(run_dir) / "moe" / "weights", moe_cfg.model,
                           extra={"stage": "test-moe"})
    finally:
        shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
