"""The MoE's tensors at the target layout, who writes each one, and what each one is read from.

The target layout's tensors are not described by hand: the MoE GPTModel is built on the *meta*
device (shapes only, no memory, no init time) at the target TP/PP/EP/expert-TP layout, and its
`sharded_state_dict()` lists every tensor slice this rank owns with its global key, shape and
offsets, exactly as training will later load them. Mapping onto the dense sources is then a
small rule per key:

Each key is given its role in the merge recipe (`recipe.py`: FFN, ROUTER or SHARED):

* `decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight` (global [layer, expert, ...]),
  FFN: expert e's slice comes from the FFN units of its segments (`experts.py`) in the dense
  `decoder.layers.mlp.linear_fc{1,2}.weight`. SwiGLU fc1 is stored as [gate; up] halves (that
  is what megatron's swiglu ShardedTensorFactory saves), so a unit range maps into both halves;
  fc2 is sliced along its columns.
* `decoder.layers.mlp.router.weight`, ROUTER: new, initialised (`router.py`).
* everything else (embeddings, attention, all norms including the pre-MLP norm, the output
  layer), SHARED: the same key and slice in every source, averaged (`Recipe.averaged`).

Ownership. Non-expert tensors are replicated over the data/expert-parallel ranks, and
megatron would let the first replica write each one; the converter instead balances them:
all ranks exchange their slice lists, every slice held by a single rank stays there, and each
replicated slice goes to the holder with the fewest bytes so far (largest first, ties to the
lowest rank, so every rank computes the same answer). Only the owner allocates, reads and
writes a slice; the others keep a meta tensor, which the checkpoint writer never touches
(it writes main replicas only). So every rank holds only its own output shard, and doubling
the ranks halves it. Each owned slice is its own tensor (never a view into a larger buffer):
megatron's writer clones views before writing, which would double the memory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from nemo_btx.errors import CheckpointError
from nemo_btx.mixing.experts import pieces
from nemo_btx.mixing.recipe import FFN, ROUTER, SHARED
from nemo_btx.mixing.sources import VOCAB_PADDED, Region, SliceReader

ROUTER_KEY = "decoder.layers.mlp.router.weight"
EXPERT_PREFIX = "decoder.layers.mlp.experts.experts."
DENSE_MLP_PREFIX = "decoder.layers.mlp."


@dataclass
class OutShard:
    """One ShardedTensor of the target model on this rank."""

    sh: object
    """The meta ShardedTensor: key, global shape and offsets, local shape, dtype."""
    kind: str
    """Its role in the recipe: recipe.ROUTER | FFN | SHARED."""
    owner: int = -1
    data: Optional[torch.Tensor] = None
    """The real tensor, on the owner only."""
    keep: object = None
    """What `data` lives in when it is mapped from a source file (must outlive `data`)."""

    @property
    def key(self) -> str:
        return self.sh.key

    @property
    def region(self) -> Region:
        sh = self.sh
        lengths = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        return tuple(zip(sh.global_offset, lengths))

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.sh.local_shape:
            n *= d
        return n * torch.tensor([], dtype=self.sh.dtype).element_size()

    @property
    def ident(self) -> Tuple[str, tuple]:
        return self.key, tuple(self.sh.global_offset)


def _kind(key: str) -> str:
    """The recipe role of a megatron-core key."""
    if key == ROUTER_KEY:
        return ROUTER
    if key.startswith(EXPERT_PREFIX):
        return FFN
    if key.startswith("decoder.layers.mlp.router."):
        raise CheckpointError(f"router tensor {key!r} is not supported by mix (only the router "
                              "weight; expert bias / score correction are off in nemo-btx)")
    return SHARED


def target_shards(chunks) -> Tuple[List[OutShard], list]:
    """This rank's tensors (factories expanded) and extra-state objects of the meta-built MoE."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject, ShardedTensor, ShardedTensorFactory)

    from nemo_btx.model.build import unwrap

    tensors, objects = [], []
    for chunk in chunks:
        for value in nested_values(unwrap(chunk).sharded_state_dict()):
            built = nested_values(value.build()) if isinstance(value, ShardedTensorFactory) else [value]
            for item in built:
                if isinstance(item, ShardedTensor):
                    tensors.append(OutShard(sh=item, kind=_kind(item.key)))
                elif isinstance(item, ShardedObject):
                    objects.append(item)
    return tensors, objects


def assign_owners(shards: List[OutShard]) -> List[int]:
    """Collective: choose one writer per slice (see the module docstring); return bytes per rank."""
    world = torch.distributed.get_world_size()
    mine = [(s.key, tuple(s.sh.global_offset), s.nbytes) for s in shards]
    every: List[list] = [None] * world
    torch.distributed.all_gather_object(every, mine)
    holders: Dict[tuple, List[int]] = defaultdict(list)
    size: Dict[tuple, int] = {}
    for r, lst in enumerate(every):
        for key, offset, nbytes in lst:
            holders[(key, offset)].append(r)
            size[(key, offset)] = nbytes
    load = [0] * world
    owner: Dict[tuple, int] = {}
    for ident in sorted(holders, key=lambda k: (len(holders[k]) > 1, -size[k], k)):
        best = min(holders[ident], key=lambda r: (load[r], r))
        owner[ident] = best
        load[best] += size[ident]
    for s in shards:
        s.owner = owner[s.ident]
    return load


def allocate(shard: OutShard, accumulate_dtype: torch.dtype) -> torch.Tensor:
    """The owner's buffer, uninitialised (every element is written by the reads or the router);
    averages of low-precision weights accumulate in `accumulate_dtype`."""
    sh = shard.sh
    dtype = sh.dtype
    if shard.kind == SHARED and dtype not in (torch.float32, torch.float64):
        dtype = accumulate_dtype
    return torch.empty(sh.local_shape, dtype=dtype)


def add_average_reads(shard: OutShard, buf: torch.Tensor, readers: List[SliceReader],
                      averaged) -> None:
    """The recipe's terms (`Recipe.averaged`: source, weight) of the same slice into `buf`:
    the first term initialises it (buf = w0 * x0), the others add (buf += ws * xs), in source
    order on every layout."""
    region = shard.region
    view = buf.view([n for _, n in region])
    terms = []
    for source, w in averaged:
        reader = readers[source]
        src_shape = reader.src.tensors().get(shard.key, (None,))[0]
        if src_shape is None:
            raise CheckpointError(f"{reader.src.path}: has no tensor {shard.key!r} (the MoE needs it)")
        clipped, dest = region, view
        if tuple(src_shape) != tuple(shard.sh.global_shape):
            if not (shard.key in VOCAB_PADDED and tuple(src_shape[1:]) == tuple(shard.sh.global_shape[1:])):
                raise CheckpointError(f"{reader.src.path}: tensor {shard.key!r} has shape "
                                      f"{list(src_shape)}, the MoE needs {list(shard.sh.global_shape)}")
            # Vocabulary padded for another TP size: rows past the source's padding stay zero.
            (start, length), rest = region[0], region[1:]
            length = max(0, min(start + length, src_shape[0]) - start)
            clipped, dest = (((start, length),) + rest, view[:length]) if length else (None, None)
        terms.append((reader, w, clipped, dest))
    partial = any(clipped != region for _, _, clipped, _ in terms)
    if partial:
        buf.zero_()
    for i, (reader, w, clipped, dest) in enumerate(terms):
        if clipped is not None:
            reader.add(shard.key, clipped, dest, weight=w, first=(i == 0 and not partial))


def add_expert_reads(shard: OutShard, readers: List[SliceReader], layout, dense_ffn: int,
                     glu: bool) -> None:
    """Expert e's slice of fc1/fc2 from its segments' FFN units in the dense sources.

    A slice that is exactly one stored source chunk (plain BTX and upcycling at matching TP)
    adopts that chunk as its tensor; anything else gets a buffer filled piece by piece.
    """
    sh = shard.sh
    name = shard.key[len(EXPERT_PREFIX):]
    if name not in ("linear_fc1.weight", "linear_fc2.weight") or sh.prepend_axis_num != 2:
        raise CheckpointError(f"expert tensor {shard.key!r} is not supported by mix "
                              "(experts without biases, local or TE spec)")
    dense_key = DENSE_MLP_PREFIX + name
    fc1 = name.startswith("linear_fc1")
    region = shard.region
    (layer, _), (expert, _) = region[0], region[1]
    # Axes of the expert slice (after [layer, expert]) and of the dense tensor (after [layer]).
    ffn_axis, other_axis = (0, 1) if fc1 else (1, 0)
    a, n = region[2 + ffn_axis]
    other = region[2 + other_axis]
    expert_ffn = sh.global_shape[2 + ffn_axis] // (2 if fc1 and glu else 1)
    halves = 2 if fc1 and glu else 1
    reads = []  # (source, dense region, position along the slice's FFN axis, count)
    for half in range(halves):
        lo, hi = max(a, half * expert_ffn), min(a + n, (half + 1) * expert_ffn)
        if lo >= hi:
            continue
        for source, src_unit, exp_unit, count in pieces(layout[expert], lo - half * expert_ffn, hi - lo):
            src_pos = half * dense_ffn + src_unit
            src_region = (((layer, 1), (src_pos, count), other) if fc1
                          else ((layer, 1), other, (src_pos, count)))
            reads.append((source, src_region, half * expert_ffn + exp_unit - a, count))

    def own(tensor, keep):
        shard.data, shard.keep = tensor, keep

    if len(reads) == 1 and reads[0][3] == n:
        source, src_region, _, _ = reads[0]
        readers[source].adopt(dense_key, src_region, tuple(sh.local_shape), sh.dtype, own)
        return
    buf = torch.empty(sh.local_shape, dtype=sh.dtype)
    own(buf, None)
    for source, src_region, pos, count in reads:
        dest = buf[pos:pos + count, :] if fc1 else buf[:, pos:pos + count]
        readers[source].add(dense_key, src_region, dest.unsqueeze(0))
