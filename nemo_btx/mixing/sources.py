"""Dense source checkpoints: checked before anything is built, then read slice by slice.

Why not `dist_checkpointing.load` with a request state dict? It is collective: every rank must
call it the same number of times with matching plans, although in a mix each rank needs a
different, uneven set of slices (its experts, the replicated tensors it was chosen to write),
and it rebuilds the checkpoint plan on every call. A torch_dist checkpoint is a
torch.distributed.checkpoint (DCP) directory, so each rank instead drives DCP's own
`FileSystemReader` with read items it builds from the checkpoint index, independently of the
other ranks (no collectives while reading):

* one read item per *stored chunk* that overlaps what this rank needs, in file order, so each
  stored byte is read at most once per rank and the files are read sequentially;
* a chunk lands directly in its destination when it is exactly one expert slice (no copy), and
  otherwise in one chunk-sized buffer that is then copied or weighted-added into every
  destination that needs part of it (averaging, upcycling's many experts, resharding);
* every chunk is checked for NaN/Inf as it arrives, so a bad source is named with the tensor.

Stored chunks are what the writer's layout made them (one per layer, TP shard and SwiGLU
half). A chunk that is larger than what a rank needs is still read whole (torch.load needs the
whole blob), which is the only read amplification: it happens when the target layout cuts
finer than the sources' layout (e.g. TP=2 targets from TP=1 experts read each FFN chunk twice,
once per TP rank).

The upfront checks (markers, model shapes, index, file sizes) cost no tensor reads, so a bad
input fails in seconds with its path, before a process group or output exists.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from nemo_btx.errors import CheckpointError

log = logging.getLogger(__name__)

Region = Tuple[Tuple[int, int], ...]
"""(start, length) along every axis of a tensor's global shape."""

#: Tensors whose first axis is the TP-padded vocabulary: their global shapes may differ between
#: checkpoints saved at different TP sizes; the rows past the smaller padding are never used.
VOCAB_PADDED = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class MixSource:
    """One dense checkpoint that joins the MoE."""

    name: str
    """Label in logs and the manifest: the domain name, or `seed`."""
    path: Path
    role: str
    """`expert` or `seed` (the generalist expert; the only source of `upcycle`)."""
    domains: List[str] = field(default_factory=list)
    """Domains whose data represents this source (router_init=data)."""
    marker: Optional[dict] = None
    """Its btx_checkpoint.json, filled in by `inspect_source`."""
    metadata: object = field(default=None, repr=False)
    """Its DCP index (torch.distributed.checkpoint Metadata), filled in by `inspect_source`."""

    def tensors(self) -> Dict[str, Tuple[tuple, torch.dtype]]:
        """fqn -> (global shape, dtype) of every tensor in the checkpoint."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {k: (tuple(v.size), v.properties.dtype)
                for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)}


def read_index(path: Path):
    """The DCP index of a checkpoint directory, or a CheckpointError saying why not."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: no .metadata file: not a torch_dist checkpoint")
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # truncated or corrupt pickle
        raise CheckpointError(f"{path}/.metadata: unreadable ({type(err).__name__}: {err})") from None


def check_files(path: Path, metadata) -> int:
    """Every data file the index points into exists and is long enough; return total bytes."""
    need: Dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing shard file (the checkpoint index points into it)")
        have = file.stat().st_size
        if have < size:
            raise CheckpointError(f"{file}: truncated shard file: {have} bytes, the checkpoint "
                                  f"index needs at least {size}")
    return sum(need.values())


def inspect_source(src: MixSource, dense_model_cfg) -> MixSource:
    """Marker (complete, dense, same model as the config), index and shard files of one source."""
    from nemo_btx.training import checkpoint as ckpt

    marker = ckpt.read_marker(src.path)
    experts = (marker.get("model") or {}).get("moe", {}).get("num_experts")
    if experts is not None:
        raise CheckpointError(f"{src.path}: an MoE checkpoint ({experts} experts); mix and "
                              "upcycle take dense checkpoints")
    ckpt.check_compatible(src.path, marker, dense_model_cfg)
    src.marker = marker
    src.metadata = read_index(src.path)
    check_files(src.path, src.metadata)
    return src


def check_sources_agree(sources: List[MixSource], vocab_size: int) -> None:
    """Same tensors with the same global shapes in every source (markers can be edited or lie)."""
    ref = sources[0]
    ref_t = ref.tensors()
    for src in sources[1:]:
        got = src.tensors()
        for key in sorted(set(ref_t) ^ set(got)):
            has, lacks = (ref, src) if key in ref_t else (src, ref)
            raise CheckpointError(f"{lacks.path}: has no tensor {key!r}, which {has.path} has")
        for key, (shape, _) in ref_t.items():
            other = got[key][0]
            if other == shape:
                continue
            if (key in VOCAB_PADDED and other[1:] == shape[1:]
                    and min(other[0], shape[0]) >= vocab_size):
                continue  # padded for a different TP size
            raise CheckpointError(f"{src.path}: tensor {key!r} has shape {list(other)} but "
                                  f"{list(shape)} in {ref.path}")


def largest_tensor_bytes(sources: List[MixSource]) -> int:
    """Bytes of the largest single tensor over all sources (the memory bound's input term)."""
    best = 0
    for src in sources:
        for shape, dtype in src.tensors().values():
            n = 1
            for d in shape:
                n *= d
            best = max(best, n * torch.tensor([], dtype=dtype).element_size())
    return best


# ----------------------------------------------------------------------------------- reading


@dataclass
class _Use:
    """Part of a stored chunk that one destination needs."""

    chunk_slice: tuple
    dest: torch.Tensor
    weight: Optional[float]
    """None = copy; a float = dest += weight * part (averaging)."""


@dataclass
class _Chunk:
    fqn: str
    offsets: tuple
    sizes: tuple
    uses: List[_Use] = field(default_factory=list)
    direct: bool = False
    """Read straight into its only destination."""


def _overlap(region: Region, offsets, sizes):
    """Intersection of a region with a stored chunk, as (start, length) per axis, or None."""
    out = []
    for (start, length), off, size in zip(region, offsets, sizes):
        lo, hi = max(start, off), min(start + length, off + size)
        if lo >= hi:
            return None
        out.append((lo, hi - lo))
    return tuple(out)


class SliceReader:
    """Reads regions of one source checkpoint into destination tensors (one rank, no collectives).

    `add` records what is needed; `run` reads every overlapping stored chunk once, in file
    order, and returns the bytes read. Errors (NaN/Inf, unreadable data) are collected, not
    raised, so that a failing rank still reaches the job's next collective and every rank can
    raise the same error (a rank raising alone would leave the others waiting).
    """

    def __init__(self, src: MixSource):
        self.src = src
        self._chunks: Dict[Tuple[str, tuple], _Chunk] = {}
        self.errors: List[str] = []

    def add(self, fqn: str, region: Region, dest: torch.Tensor, weight: Optional[float] = None) -> None:
        """Need `region` of tensor `fqn` in `dest` (shaped like the region's lengths)."""
        meta = self.src.metadata.state_dict_metadata.get(fqn)
        if meta is None or not hasattr(meta, "chunks"):
            raise CheckpointError(f"{self.src.path}: has no tensor {fqn!r}")
        assert tuple(dest.shape) == tuple(n for _, n in region), (fqn, dest.shape, region)
        covered = 0
        for chunk in meta.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            inter = _overlap(region, offsets, sizes)
            if inter is None:
                continue
            entry = self._chunks.setdefault((fqn, offsets), _Chunk(fqn, offsets, sizes))
            chunk_slice = tuple(slice(s - o, s - o + n) for (s, n), o in zip(inter, offsets))
            dest_slice = tuple(slice(s - r, s - r + n) for (s, n), (r, _) in zip(inter, region))
            entry.uses.append(_Use(chunk_slice, dest[dest_slice], weight))
            size = 1
            for _, n in inter:
                size *= n
            covered += size
        want = 1
        for _, n in region:
            want *= n
        if covered != want:
            raise CheckpointError(f"{self.src.path}: tensor {fqn!r} does not cover the region "
                                  f"{region} ({covered} of {want} elements stored)")

    def __len__(self) -> int:
        return len(self._chunks)

    def run(self) -> int:
        """Read every needed chunk; apply it to its destinations; return bytes read."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

        if not self._chunks:
            return 0
        storage = self.src.metadata.storage_data
        items, total = [], 0
        for (fqn, offsets), chunk in self._chunks.items():
            index = MetadataIndex(fqn, offsets)
            info = storage[index]
            total += info.length
            zeros = torch.Size([0] * len(offsets))
            items.append(((info.relative_path, info.offset), ReadItem(
                type=LoadItemType.TENSOR, dest_index=index, dest_offsets=zeros,
                storage_index=index, storage_offsets=zeros, lengths=torch.Size(chunk.sizes))))
        items.sort(key=lambda x: x[0])  # file order: sequential reads
        reader = FileSystemReader(str(self.src.path))
        reader.set_up_storage_reader(self.src.metadata, is_coordinator=True)
        plan = LoadPlan([item for _, item in items])
        try:
            reader.read_data(plan, self).wait()
        except Exception as err:  # corrupt data behind an intact index
            self.errors.append(f"{self.src.path}: cannot read tensor data "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:300]})")
        self._chunks.clear()
        return total

    # --- the two LoadPlanner hooks FileSystemReader.read_data calls

    def resolve_tensor(self, item) -> torch.Tensor:
        chunk = self._chunks[(item.dest_index.fqn, tuple(item.dest_index.offset))]
        dtype = self.src.metadata.state_dict_metadata[chunk.fqn].properties.dtype
        if len(chunk.uses) == 1:
            use = chunk.uses[0]
            whole = tuple(use.dest.shape) == chunk.sizes
            if whole and use.weight is None:
                chunk.direct = True  # straight into the MoE tensor: no extra copy
                return use.dest
            dtype = use.dest.dtype  # accumulate in the destination's precision
        return torch.empty(chunk.sizes, dtype=dtype)

    def commit_tensor(self, item, tensor: torch.Tensor) -> None:
        chunk = self._chunks[(item.dest_index.fqn, tuple(item.dest_index.offset))]
        if self.errors:
            return  # the mix fails anyway; skip the work
        if not bool(torch.isfinite(tensor).all()):
            bad = (~torch.isfinite(tensor)).sum().item()
            self.errors.append(f"{self.src.path}: tensor {chunk.fqn!r} holds {bad} NaN/Inf "
                               f"values (stored chunk at offsets {list(chunk.offsets)})")
            return
        if chunk.direct:
            chunk.uses.clear()
            return
        for use in chunk.uses:
            part = tensor[use.chunk_slice]
            if use.weight is None:
                use.dest.copy_(part)
            elif len(chunk.uses) == 1:
                use.dest.add_(part.mul_(use.weight))  # the buffer is ours: scale in place
            else:
                use.dest.add_(part * use.weight)
        chunk.uses.clear()

    def load_bytes(self, item, value) -> None:  # pragma: no cover - we only request tensors
        raise AssertionError("SliceReader reads tensors only")
