"""Data-parallel evaluation: every rank holds the whole model and scores a share of the requests.

lm-eval already knows how to spread an evaluation over ranks: `evaluate()` hands each rank
every `world_size`-th document (`task.build_all_requests(rank=, world_size=)`), pads the ranks
to the same number of requests, and gathers the per-document metrics on rank 0, which alone
aggregates and returns the results (the others get None). It needs only the model's `rank`,
`world_size`, `device` and three collectives, `all_gather`, `gather_object` and `barrier`;
`DataParallel` provides them over torch.distributed (gloo on CPU, NCCL on GPUs), on
megatron-core's data-parallel group, so no request splitter of our own exists.

Scores equal one process's: a document's requests are scored by the same model on the same
tokens whichever rank holds it, its metric is computed on that rank, and rank 0 aggregates the
gathered per-document values. Each rank runs at TP=PP=EP=1 (`model.py` loads any checkpoint
that way), so `torchrun --nproc-per-node N` evaluates with N data-parallel ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def dp_rank_and_size() -> Tuple[int, int, Optional[Any]]:
    """(rank, size, group) of this process in the data-parallel group; (0, 1, None) alone."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1, None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return dist.get_rank(), dist.get_world_size(), None
    group = parallel_state.get_data_parallel_group()
    return dist.get_rank(group), dist.get_world_size(group), group


class DataParallel:
    """lm-eval's distributed interface (`lm_eval.api.model.LM`): a base class listed before `LM`, whose
    no-op versions it overrides."""

    def _init_data_parallel(self, device: torch.device) -> None:
        self._rank, self._world_size, self._dp_group = dp_rank_and_size()
        self._device = device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self) -> torch.device:
        return self._device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` concatenated along dim 0 (a scalar becomes one entry per rank),
        as accelerate's `gather`, which lm-eval's evaluator expects."""
        if self._world_size == 1:
            return tensor.reshape(-1) if tensor.dim() == 0 else tensor
        t = (tensor.reshape(1) if tensor.dim() == 0 else tensor).contiguous()
        parts = [torch.empty_like(t) for _ in range(self._world_size)]
        dist.all_gather(parts, t, group=self._dp_group)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0) -> Optional[List]:
        """Every rank's `obj` on rank `dst` of the group, in rank order; None elsewhere."""
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=self._global(dst), group=self._dp_group)
        return out

    @contextlib.contextmanager
    def alone(self):
        """Rank 0 presents itself to lm-eval as the only rank for the duration (lm-eval fails
        on a rank that gets no document, so a limit below the number of ranks runs there)."""
        saved = self._rank, self._world_size
        self._world_size = 1
        try:
            yield
        finally:
            self._rank, self._world_size = saved

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier(group=self._dp_group)

    def _global(self, group_rank: int) -> int:
        return group_rank if self._dp_group is None else dist.get_global_rank(self._dp_group, group_rank)


def map_in_order(fn: Callable[[Any], Any], items: Sequence) -> List[Any]:
    """`[fn(x) for x in items]`, each rank computing every `world_size`-th item (lm-eval's split
    of documents), the values gathered on every rank in item order, so whatever is summed over
    them adds up in the order one process adds it (bit-identical totals)."""
    rank, size, group = dp_rank_and_size()
    mine = [(i, fn(x)) for i, x in enumerate(items) if i % size == rank]
    if size == 1:
        return [v for _, v in mine]
    parts: List = [None] * size
    dist.all_gather_object(parts, mine, group=group)
    return [v for _, v in sorted((p for part in parts for p in part), key=lambda p: p[0])]
