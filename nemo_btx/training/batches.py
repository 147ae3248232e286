"""Global batches and their data-parallel slices.

Every rank draws the same global batch for a step and keeps only its own slice. That costs a
little redundant work per rank, and buys the property the parallel tests rely on: the tokens a
step trains on do not depend on the layout (TP, PP, EP, DP) of the job.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from nemo_btx.config.schema import ExperimentConfig


def synthetic_global_batch(cfg: ExperimentConfig, step: int) -> torch.Tensor:
    """`[global_batch, seq+1]` tokens of a fixed random Markov chain (learnable, no files).

    Each token follows its predecessor through one fixed permutation with probability 0.9 and
    is uniform otherwise, so a model that learns the permutation drives the loss from ln(V)
    towards the chain's entropy. Used by the smoke stage and the parallel-equivalence tests.
    """
    vocab = cfg.model.vocab_size
    structure = torch.Generator().manual_seed(cfg.train.seed)
    perm = torch.randperm(vocab, generator=structure)
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    b, s = cfg.train.global_batch_size, cfg.model.seq_length + 1
    tokens = torch.empty(b, s, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (b,), generator=gen)
    follow = torch.rand(b, s, generator=gen) < 0.9
    noise = torch.randint(vocab, (b, s), generator=gen)
    for i in range(1, s):
        tokens[:, i] = torch.where(follow[:, i], perm[tokens[:, i - 1]], noise[:, i])
    return tokens


def rank_microbatches(cfg: ExperimentConfig, global_tokens: torch.Tensor,
                      dp_rank: int, dp_size: int, device: torch.device) -> List[Dict[str, torch.Tensor]]:
    """This data-parallel rank's contiguous slice of the global batch, cut into micro-batches."""
    from nemo_btx.training.step import make_batch, to_device

    per_rank = global_tokens.shape[0] // dp_size
    mine = global_tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    mbs = cfg.train.micro_batch_size
    return [to_device(make_batch(mine[i:i + mbs]), device) for i in range(0, per_rank, mbs)]
