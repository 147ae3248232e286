"""Dense source checkpoints: checked before anything is built, then read slice by slice.

Why not `dist_checkpointing.load` with a request state dict? It is collective: every rank must
call it the same number of times with matching plans, although in a mix each rank needs a
different, uneven set of slices (its experts, the replicated tensors it was chosen to write),
and it rebuilds the checkpoint plan on every call. A torch_dist checkpoint is a
torch.distributed.checkpoint (DCP) directory, so each rank instead reads the chunks it needs
from the checkpoint index itself, independently of the other ranks (no collectives while
reading):

* every *stored chunk* that overlaps what this rank needs is read once, in file order, so
  each stored byte is read at most once per rank and the files are read sequentially;
* an expert slice that is exactly one stored chunk is not copied at all: the chunk is mapped
  from the page cache (private, read-only in effect) and handed to the checkpoint writer as is;
  the first term of an average is read straight into its buffer; other chunks go through one
  reused scratch buffer and are copied or weighted-added into every destination that needs
  part of them (averaging, upcycling's many experts, resharding);
* every chunk is checked for NaN/Inf as it arrives, so a bad source is named with the tensor.

DCP stores each chunk as a small torch.save zip; the raw bytes are located by parsing that
zip and its pickle (only a plain contiguous tensor of the expected dtype and shape is
accepted). Anything unexpected takes the general path, DCP's own `FileSystemReader` with this
module as its planner (torch.load per chunk), which gives bit-identical results (tested). That
fast path exists because torch.load allocates and copies every chunk once more: measured 3-6x
slower than the read itself on the benchmark, most of it page faults on fresh memory.

Stored chunks are what the writer's layout made them (one per layer, TP shard and SwiGLU
half). A chunk that is larger than what a rank needs is still read whole, which is the only
read amplification: it happens when the target layout cuts finer than the sources' layout
(e.g. TP=2 targets from TP=1 experts read each FFN chunk on both TP ranks).

The upfront checks (markers, model shapes, index, file sizes) cost no tensor reads, so a bad
input fails in seconds with its path, before a process group or output exists. A source file
truncated *while* a mix maps it would crash the job (SIGBUS) rather than corrupt the output,
which is written atomically anyway.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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
    """One dense checkpoint that joins the MoE: a recipe source (`recipe.Source`) and, once
    inspected, its marker and index."""

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

    @classmethod
    def of(cls, source) -> "MixSource":
        """The checkpoint of a `recipe.Source`."""
        return cls(name=source.name, path=source.path, role=source.role, domains=list(source.domains))

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
    import dataclasses

    from nemo_btx.mixing.recipe import check_architecture
    from nemo_btx.training import checkpoint as ckpt

    marker = ckpt.read_marker(src.path)
    experts = (marker.get("model") or {}).get("moe", {}).get("num_experts")
    if experts is not None:
        raise CheckpointError(f"{src.path}: an MoE checkpoint ({experts} experts); mix and "
                              "upcycle take dense checkpoints")
    check_architecture(("the config", dataclasses.asdict(dense_model_cfg)),
                       [(src.path, marker.get("model"))])
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
    """Bytes of the largest single input tensor as stored, over all sources.

    Megatron's global keys stack layers ([layers, ...]), but each layer's tensor (and TP
    shard) is stored and read as its own chunk, so the unit is the stored chunk: the
    embedding or output layer for a Llama-like model. This is the memory bound's input term.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    best = 0
    for src in sources:
        for meta in src.metadata.state_dict_metadata.values():
            if not isinstance(meta, TensorStorageMetadata):
                continue
            size = torch.tensor([], dtype=meta.properties.dtype).element_size()
            for chunk in meta.chunks:
                n = size
                for d in chunk.sizes:
                    n *= d
                best = max(best, n)
    return best


# ----------------------------------------------------------------------------------- reading


@dataclass
class _Use:
    """Part of a stored chunk that one destination needs."""

    chunk_slice: tuple
    dest: torch.Tensor
    weight: Optional[float]
    """None = copy; a float = weighted average term."""
    first: bool = False
    """The first term of its average: dest = weight * part (else dest += weight * part)."""
    adopt: Optional[Callable] = None
    """Instead of copying: hand the chunk's own tensor to adopt(tensor, keepalive)."""


@dataclass
class _Chunk:
    fqn: str
    offsets: tuple
    sizes: tuple
    dtype: torch.dtype
    uses: List[_Use] = field(default_factory=list)
    direct: bool = False
    """Read straight into its only destination."""

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.sizes:
            n *= d
        return n * torch.tensor([], dtype=self.dtype).element_size()

    def whole_use(self) -> Optional[_Use]:
        """The single use that needs the whole chunk in a same-dtype contiguous tensor, if any."""
        if len(self.uses) != 1 or self.uses[0].adopt is not None:
            return None
        use = self.uses[0]
        if (tuple(use.dest.shape) == self.sizes and use.dest.dtype == self.dtype
                and use.dest.is_contiguous() and (use.weight is None or use.first)):
            return use
        return None


def _overlap(region: Region, offsets, sizes):
    """Intersection of a region with a stored chunk, as (start, length) per axis, or None."""
    out = []
    for (start, length), off, size in zip(region, offsets, sizes):
        lo, hi = max(start, off), min(start + length, off + size)
        if lo >= hi:
            return None
        out.append((lo, hi - lo))
    return tuple(out)


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf. A sum is ~30x faster than isfinite().all() and is non-finite whenever an
    element is; only then (or on fp32 overflow of the sum) is the exact test run."""
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


# --- torch.save blobs: where the raw bytes of the one tensor are (fast path, fully verified)

_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16,
                   "HalfStorage": torch.float16, "DoubleStorage": torch.float64}


class _Probe(pickle.Unpickler):
    """Reads a torch.save data.pkl of ONE tensor without building it: (storage pid, offset,
    size, stride). Any other content raises, and the caller falls back to torch.load."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: ("tensor", storage, offset,
                                                              tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")

    def persistent_load(self, pid):
        return pid


class _Window(io.RawIOBase):
    """A read-only, seekable window [start, start+length) of an open file (one DCP item)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.f.fileno(), n, self.start + self.pos)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _contiguous_strides(sizes) -> tuple:
    strides, acc = [], 1
    for d in reversed(sizes):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def _raw_offset(f, info, chunk: _Chunk) -> Optional[int]:
    """File offset of the chunk's raw little-endian bytes, or None if not a plain torch.save
    blob of exactly this contiguous tensor (then the caller uses torch.load instead)."""
    if info.transform_descriptors or sys.byteorder != "little":
        return None
    try:
        zf = zipfile.ZipFile(_Window(f, info.offset, info.length))
        names = zf.namelist()
        prefix = names[0].split("/")[0]
        order = zf.read(f"{prefix}/byteorder") if f"{prefix}/byteorder" in names else b"little"
        if order != b"little":
            return None
        tag, pid, offset, size, stride = _Probe(io.BytesIO(zf.read(f"{prefix}/data.pkl"))).load()
        _, storage_type, key, _, numel = pid
        record = zf.getinfo(f"{prefix}/data/{key}")
        n = 1
        for d in size:
            n *= d
        if (tag != "tensor" or offset != 0 or size != chunk.sizes or numel != n
                or stride != _contiguous_strides(size) or _STORAGE_DTYPES[storage_type] != chunk.dtype
                or record.compress_type != zipfile.ZIP_STORED or record.file_size != chunk.nbytes
                or len([x for x in names if x.startswith(f"{prefix}/data/")]) != 1):
            return None
        header = os.pread(f.fileno(), 30, info.offset + record.header_offset)
        if header[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.offset + record.header_offset + 30 + name_len + extra_len
    except Exception:  # anything unexpected: the general path decides
        return None


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


class SliceReader:
    """Reads regions of one source checkpoint into destination tensors (one rank, no collectives).

    `add` records what is needed; `run` reads every overlapping stored chunk once, in file
    order, and returns the bytes read. Errors (NaN/Inf, unreadable data) are collected, not
    raised, so that a failing rank still reaches the job's next collective and every rank can
    raise the same error (a rank raising alone would leave the others waiting).

    Fast path: DCP stores each chunk as a small torch.save zip whose tensor bytes sit
    uncompressed at a fixed offset. When the blob is verified to hold exactly the expected
    contiguous tensor, its bytes are read with one pread straight into the destination (an
    expert slice, or the first term of an average) or into one reused scratch buffer. That
    avoids torch.load's fresh allocation and extra copy per chunk, which measured 3-5x slower
    than the read itself. Anything else goes through DCP's FileSystemReader (torch.load).
    """

    def __init__(self, src: MixSource):
        self.src = src
        self._chunks: Dict[Tuple[str, tuple], _Chunk] = {}
        self.errors: List[str] = []
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._maps: Dict[str, object] = {}
        self._keep = None

    def add(self, fqn: str, region: Region, dest: torch.Tensor, weight: Optional[float] = None,
            first: bool = False) -> None:
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
            entry = self._chunks.setdefault(
                (fqn, offsets), _Chunk(fqn, offsets, sizes, meta.properties.dtype))
            chunk_slice = tuple(slice(s - o, s - o + n) for (s, n), o in zip(inter, offsets))
            dest_slice = tuple(slice(s - r, s - r + n) for (s, n), (r, _) in zip(inter, region))
            entry.uses.append(_Use(chunk_slice, dest[dest_slice], weight, first))
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

    def adopt(self, fqn: str, region: Region, shape: tuple, dtype: torch.dtype,
              on_tensor: Callable) -> None:
        """Need `region` of `fqn` as a tensor of its own (`shape`), given to on_tensor(t, keep).

        When the region is exactly one stored chunk of the same dtype, that chunk IS the
        tensor: it is mapped from the page cache (copy-on-write, never written back) instead of
        copied, and the checkpoint writer later reads it from there; `keep` (the mapping) must
        live as long as the tensor. Otherwise a buffer is allocated and filled by copies.
        """
        meta = self.src.metadata.state_dict_metadata.get(fqn)
        if meta is None or not hasattr(meta, "chunks"):
            raise CheckpointError(f"{self.src.path}: has no tensor {fqn!r}")
        starts = tuple(s for s, _ in region)
        lengths = tuple(n for _, n in region)
        exact = [c for c in meta.chunks if tuple(c.offsets) == starts and tuple(c.sizes) == lengths]
        if not exact or meta.properties.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype)
            on_tensor(buf, None)
            self.add(fqn, region, buf.view(lengths))
            return
        entry = self._chunks.setdefault((fqn, starts), _Chunk(fqn, starts, lengths, dtype))
        full = tuple(slice(0, n) for n in lengths)
        entry.uses.append(_Use(full, None, None, adopt=lambda t, keep: on_tensor(t.view(shape), keep)))

    def __len__(self) -> int:
        return len(self._chunks)

    def run(self) -> int:
        """Read every needed chunk; apply it to its destinations; return bytes read."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        storage = self.src.metadata.storage_data
        order = sorted(self._chunks.values(), key=lambda c: (
            storage[MetadataIndex(c.fqn, c.offsets)].relative_path,
            storage[MetadataIndex(c.fqn, c.offsets)].offset))
        total, slow = 0, []
        files: Dict[str, object] = {}
        try:
            for chunk in order:
                if self.errors:
                    break
                info = storage[MetadataIndex(chunk.fqn, chunk.offsets)]
                total += info.length
                f = files.get(info.relative_path)
                if f is None:
                    f = files[info.relative_path] = open(self.src.path / info.relative_path, "rb",
                                                         buffering=0)
                where = _raw_offset(f, info, chunk)
                if where is None:
                    slow.append(chunk)
                    continue
                use = chunk.whole_use()
                if any(u.adopt is not None for u in chunk.uses):
                    self._apply(chunk, self._own_tensor(f, info, chunk, where))
                elif use is not None:
                    _pread_into(f.fileno(), _bytes_of(use.dest), where)
                    chunk.direct = True
                    self._apply(chunk, use.dest)
                else:
                    if self._scratch.numel() < chunk.nbytes:
                        self._scratch = torch.empty(chunk.nbytes, dtype=torch.uint8)
                    view = self._scratch[:chunk.nbytes]
                    _pread_into(f.fileno(), _bytes_of(view), where)
                    self._apply(chunk, view.view(chunk.dtype).view(chunk.sizes))
        except OSError as err:
            self.errors.append(f"{self.src.path}: cannot read tensor data ({err})")
        finally:
            for f in files.values():
                f.close()
        if slow and not self.errors:
            self._read_slow(slow)
        self._chunks.clear()
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._maps = {}
        return total

    def _own_tensor(self, f, info, chunk: _Chunk, where: int) -> torch.Tensor:
        """The chunk as a tensor nobody else writes to: mapped from the file, else read."""
        import mmap

        size = torch.tensor([], dtype=chunk.dtype).element_size()
        if where % size == 0:
            mm = self._maps.get(info.relative_path)
            if mm is None:
                mm = self._maps[info.relative_path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._keep = mm
            n = chunk.nbytes // size
            return torch.frombuffer(mm, dtype=chunk.dtype, count=n, offset=where).view(chunk.sizes)
        self._keep = None
        t = torch.empty(chunk.sizes, dtype=chunk.dtype)
        _pread_into(f.fileno(), _bytes_of(t), where)
        return t

    def _read_slow(self, chunks: List[_Chunk]) -> None:
        """The general path: DCP's FileSystemReader, with this object as its planner."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

        items = []
        for chunk in chunks:
            index = MetadataIndex(chunk.fqn, chunk.offsets)
            zeros = torch.Size([0] * len(chunk.offsets))
            items.append(ReadItem(type=LoadItemType.TENSOR, dest_index=index, dest_offsets=zeros,
                                  storage_index=index, storage_offsets=zeros,
                                  lengths=torch.Size(chunk.sizes)))
        reader = FileSystemReader(str(self.src.path))
        reader.set_up_storage_reader(self.src.metadata, is_coordinator=True)
        try:
            reader.read_data(LoadPlan(items), self).wait()
        except Exception as err:  # corrupt data behind an intact index
            self.errors.append(f"{self.src.path}: cannot read tensor data "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:300]})")

    def _apply(self, chunk: _Chunk, data: torch.Tensor) -> None:
        """Check `data` (the whole chunk) and copy / weight it into every destination."""
        if not _finite(data):
            bad = (~torch.isfinite(data)).sum().item()
            self.errors.append(f"{self.src.path}: tensor {chunk.fqn!r} holds {bad} NaN/Inf "
                               f"values (stored chunk at offsets {list(chunk.offsets)})")
            return
        for use in chunk.uses:
            if use.adopt is not None:
                use.adopt(data, self._keep)
                continue
            if chunk.direct:  # already in place; only an average's first term needs scaling
                if use.weight is not None:
                    use.dest.mul_(use.weight)
                continue
            part = data[use.chunk_slice]
            if use.weight is None:
                use.dest.copy_(part)
            else:
                part = part.to(use.dest.dtype)  # bf16 sources: average in fp32
                if use.first:
                    torch.mul(part, use.weight, out=use.dest)
                elif len(chunk.uses) == 1 and part.data_ptr() == data.data_ptr() and part.shape == data.shape:
                    use.dest.add_(part.mul_(use.weight))  # the buffer is ours: scale in place
                else:
                    use.dest.add_(part * use.weight)
        chunk.uses.clear()

    # --- the two LoadPlanner hooks FileSystemReader.read_data calls (general path)

    def resolve_tensor(self, item) -> torch.Tensor:
        chunk = self._chunks[(item.dest_index.fqn, tuple(item.dest_index.offset))]
        self._keep = None  # a fresh buffer: adopted as is
        use = chunk.whole_use()
        if use is not None:
            chunk.direct = True  # straight into the MoE tensor: no extra copy
            return use.dest.view(chunk.sizes)
        return torch.empty(chunk.sizes, dtype=chunk.dtype)

    def commit_tensor(self, item, tensor: torch.Tensor) -> None:
        chunk = self._chunks[(item.dest_index.fqn, tuple(item.dest_index.offset))]
        if not self.errors:
            self._apply(chunk, tensor)

    def load_bytes(self, item, value) -> None:  # pragma: no cover - we only request tensors
        raise AssertionError("SliceReader reads tensors only")
