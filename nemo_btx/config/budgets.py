"""Stage budgets: the paper states them in tokens, the training loop counts optimizer steps.

`stage_iters` is the one conversion (steps = tokens / (global batch x sequence length), rounded
up); the training stages and `nemo-btx plan` both ask it.
"""

from __future__ import annotations

import math
from typing import Optional

from nemo_btx.config.schema import ExperimentConfig


def tokens_per_step(cfg: ExperimentConfig) -> int:
    return cfg.train.global_batch_size * cfg.model.seq_length


def stage_iters(cfg: ExperimentConfig, stage: str, domain: Optional[str] = None) -> int:
    """Optimizer steps of `stage` (seed, experts with its domain, finetune)."""
    if stage == "seed":
        tokens, steps = cfg.seed.tokens, cfg.seed.train_iters
    elif stage == "experts":
        tokens, steps = cfg.expert.tokens.get(domain), cfg.expert.train_iters
    elif stage == "finetune":
        tokens, steps = cfg.finetune.tokens, cfg.finetune.train_iters
    else:
        raise ValueError(f"no budget for stage {stage!r}")
    if tokens is None:
        return steps
    return max(1, math.ceil(tokens / tokens_per_step(cfg)))
