"""Data-parallel evaluation: the processes form model replicas, each replica scores a share of
the requests.

A replica is the set of ranks that together hold one copy of the model at the evaluation's
layout: its tensor- and pipeline-parallel ranks and, for an MoE, its expert-parallel ranks (the
union of megatron-core's model-parallel group and its expert tensor-model-pipeline group). Every
rank of a replica is fed the same requests, so they run the same forward passes in lockstep
(the collectives inside the model match); at TP=PP=EP=1 each process is a replica of its own.

lm-eval already knows how to spread an evaluation over ranks: `evaluate()` hands each rank
every `world_size`-th document (`task.build_all_requests(rank=, world_size=)`), pads the ranks
to the same number of requests, and gathers the per-document metrics on rank 0, which alone
aggregates and returns the results (the others get None). It needs only the model's `rank`,
`world_size`, `device` and three collectives, `all_gather`, `gather_object` and `barrier`;
`DataParallel` provides them over torch.distributed (gloo on CPU, NCCL on GPUs): `rank` is the
replica's index and the collectives run among the ranks at the same place in every replica
(`Split`), so no request splitter of our own exists.

Scores equal one process's: a document's requests are scored by the same model on the same
tokens whichever replica holds it, its metric is computed there, and replica 0 aggregates the
gathered per-document values; global rank 0 writes them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Split:
    """How this process shares the evaluation: `rank` of `size` replicas, and `group`, this
    process with its counterparts in the other replicas (None when alone)."""

    rank: int
    size: int
    group: Optional[Any]


_SPLITS: Dict[Tuple, Split] = {}


def replicas_of(memberships: Sequence[Sequence[Sequence[int]]]) -> List[List[int]]:
    """The model replicas, from every rank's model-parallel groups (by rank: the lists of
    ranks it shares a group with): ranks linked through any group form one replica. Sorted by
    lowest rank, each sorted."""
    parent = list(range(len(memberships)))

    def root(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for groups in memberships:
        for ranks in groups:
            for r in ranks[1:]:
                parent[root(r)] = root(ranks[0])
    out: Dict[int, List[int]] = {}
    for r in range(len(memberships)):
        out.setdefault(root(r), []).append(r)
    return sorted(out.values())


def current_split() -> Split:
    """This process's `Split` at the layout megatron-core is initialised with (computed once
    per layout: every rank creates the same groups, in the same order)."""
    if not dist.is_available() or not dist.is_initialized():
        return Split(0, 1, None)
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    if not ps.model_parallel_is_initialized():
        return Split(dist.get_rank(), world, None)
    key = (world, ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
           ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
    if key in _SPLITS:
        return _SPLITS[key]
    mine = [dist.get_process_group_ranks(g) for g in (
        ps.get_model_parallel_group(), ps.get_expert_tensor_model_pipeline_parallel_group())]
    everyone: List = [None] * world
    dist.all_gather_object(everyone, mine)
    replicas = replicas_of(everyone)
    me = dist.get_rank()
    index = next(i for i, r in enumerate(replicas) if me in r)
    if len(replicas) == 1:
        split = Split(0, 1, None)
    else:
        if len({len(r) for r in replicas}) != 1:
            raise RuntimeError(f"model replicas of unequal size: {replicas}")
        group = None
        for place in range(len(replicas[0])):  # every rank creates every group, in order
            ranks = [r[place] for r in replicas]
            g = dist.new_group(ranks)
            if me in ranks:
                group = g
        split = Split(index, len(replicas), group)
        # lm-eval's rank must be the replica's index on every rank of the replica
        if dist.get_rank(group) != index:
            raise RuntimeError(f"replicas {replicas}: rank {me} is {dist.get_rank(group)} of its "
                               f"group, not its replica's index {index}")
    _SPLITS[key] = split
    return split


def is_writer() -> bool:
    """Whether this process writes the evaluation's files (global rank 0; every rank of replica
    0 holds the same results)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class DataParallel:
    """lm-eval's distributed interface (`lm_eval.api.model.LM`) over model replicas: a base class
    listed before `LM`, whose no-op versions it overrides."""

    def _init_data_parallel(self, device: torch.device) -> None:
        split = current_split()
        self._rank, self._world_size, self._dp_group = split.rank, split.size, split.group
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
        """Replica 0 presents itself to lm-eval as the only one for the duration (lm-eval fails
        on a rank that gets no document, so a task with fewer documents than replicas runs
        there)."""
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
    split = current_split()
    rank, size, group = split.rank, split.size, split.group
    mine = [(i, fn(x)) for i, x in enumerate(items) if i % size == rank]
    if size == 1:
        return [v for _, v in mine]
    parts: List = [None] * size
    dist.all_gather_object(parts, mine, group=group)
    return [v for _, v in sorted((p for part in parts for p in part), key=lambda p: p[0])]
