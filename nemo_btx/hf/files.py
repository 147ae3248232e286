"""safetensors in and out; torch only where tensors are made.

Reading: a Hugging Face directory holds `model.safetensors`, or shards listed in
`model.safetensors.index.json` (`weight_map`: tensor -> file). The headers are parsed here
(8-byte little-endian length, JSON: name -> dtype, shape, data_offsets) and checked the way
safetensors checks them (offsets consistent with dtype x shape, tensors tiling the data with no
gap or overlap, the data exactly as long as the header says, so a truncated file is caught
before anything is read). `HFDir` needs no torch: the Hugging Face merge reads raw bytes from
the offsets; `HFReader` adds torch tensors for import and export.

Writing: tensors are assigned to shards by their sizes before anything is read (the names
`model-0000i-of-0000n.safetensors` need the count). `header_blob` lays out one file's header,
so a writer can put every tensor at its final offset in any order (the merge does);
`write_shards` fills shards from a producer one tensor at a time.
`model.safetensors.index.json` lists them, as `save_pretrained` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Sequence, Tuple

from nemo_btx.errors import BtxError

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: Tokenizer files copied along with a model (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")
#: Bytes per element of every safetensors dtype code.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
#: The dtypes model weights may be stored in here, by safetensors code -> torch/config.json name.
FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file."""

    dtype: str
    """safetensors dtype code (F32, BF16, ...)."""
    shape: Tuple[int, ...]
    start: int
    """Absolute byte offset of its data in the file."""
    nbytes: int


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_header(path: Path) -> Dict[str, Entry]:
    """The tensors of one safetensors file, after the checks above (errors name the file)."""
    def bad(why: str) -> BtxError:
        return BtxError(f"{path}: not a readable safetensors file ({why})")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > _MAX_HEADER:
                raise bad(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
    except OSError as err:
        raise BtxError(f"{path}: cannot read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    entries, spans = {}, []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise bad(f"entry {name!r} lacks dtype, shape or data_offsets") from None
        if dtype not in ITEMSIZE:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if begin < 0 or any(d < 0 for d in shape) or end - begin != numel(shape) * ITEMSIZE[dtype]:
            raise bad(f"tensor {name!r}: data_offsets {[begin, end]} do not hold {dtype} {list(shape)}")
        spans.append((begin, end, name))
        entries[name] = Entry(dtype, shape, 8 + n + begin, end - begin)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise bad(f"tensor {name!r} starts at {begin}, expected {pos} (overlap or gap)")
        pos = end
    if pos != size - 8 - n:
        raise bad(f"the header describes {pos} bytes of data, the file holds {size - 8 - n}"
                  + (" (truncated)" if pos > size - 8 - n else ""))
    return entries


class HFDir:
    """The tensors of a Hugging Face model directory: names, dtypes, shapes, where their bytes
    are. No torch."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map") or {}
            except (ValueError, AttributeError) as err:
                raise BtxError(f"{index}: not a safetensors index ({err})") from None
        elif (self.dir / SINGLE).is_file():
            weight_map = None
        else:
            others = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt*"))
            raise BtxError(f"{self.dir}: no {SINGLE} or {INDEX}"
                           + (f" (found {', '.join(others[:3])}: only safetensors checkpoints "
                              "import; save the model with save_pretrained(safe_serialization=True))"
                              if others else ""))
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self._entries: Dict[str, Tuple[Path, Entry]] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise BtxError(f"{path}: missing (listed in {INDEX})")
            for key, entry in read_header(path).items():
                self._entries[key] = (path, entry)
        if weight_map:
            for key, name in weight_map.items():
                if key not in self._entries or self._entries[key][0].name != name:
                    raise BtxError(f"{self.dir / INDEX}: lists {key!r} in {name}, which does not hold it")

    def names(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entries[name][1].shape

    def code(self, name: str) -> str:
        """The safetensors dtype of a weight; only F32/BF16/F16 are accepted."""
        code = self._entries[name][1].dtype
        if code not in FLOATS:
            raise BtxError(f"{self.dir}: tensor {name!r} is stored as {code}; only F32/BF16/F16 import")
        return code

    def locate(self, name: str) -> Tuple[Path, Entry]:
        return self._entries[name]

    def files(self) -> List[Path]:
        return sorted({path for path, _ in self._entries.values()})


class HFReader(HFDir):
    """`HFDir` with torch tensors."""

    def dtype(self, name: str):
        import torch

        return getattr(torch, FLOATS[self.code(name)])

    def get(self, name: str):
        """`name` read into a tensor of its own with plain reads, not through a file mapping:
        pages of a mapping stay in the process's RSS until the file is closed, so a streaming
        pass over whole models would end up holding them all."""
        import torch

        path, entry = self._entries[name]
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        read_exactly(path, entry.start, memoryview(buf.numpy()), what=f"tensor {name!r}")
        return buf.view(self.dtype(name)).view(entry.shape)


def read_exactly(path: Path, offset: int, view: memoryview, *, what: str, fd: int = None) -> None:
    """Fill `view` from `path` at `offset` (pread: no shared file position, so threads may share
    `fd`)."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        done, n = 0, len(view)
        while done < n:
            got = os.preadv(fd, [view[done:]], offset + done)
            if not got:
                raise BtxError(f"{path}: truncated inside {what}")
            done += got
    finally:
        if own:
            os.close(fd)


def header_blob(entries: Sequence[Tuple[str, str, Tuple[int, ...]]]) -> Tuple[bytes, Dict[str, Tuple[int, int]]]:
    """The header of a safetensors file holding `entries` (name, dtype code, shape) in that
    order, as `safetensors` writes it (8-byte length, JSON padded with spaces to a multiple of
    8), and each tensor's (absolute offset, nbytes) in the file."""
    header, offset, spans = {"__metadata__": {"format": "pt"}}, 0, {}
    for name, code, shape in entries:
        size = numel(shape) * ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        spans[name] = (offset, size)
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    start = 8 + len(blob)
    return len(blob).to_bytes(8, "little") + blob, {k: (start + o, n) for k, (o, n) in spans.items()}


def plan_shards(sizes: Iterable[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a larger tensor alone)."""
    shards: List[List[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def write_shards(directory: Path, shards: List[List[str]], produce: Callable[[str], "torch.Tensor"],
                 *, on_shard: Callable[[int, int], None] = lambda i, n: None) -> dict:
    """Write `shards` (names from `plan_shards`) into `directory`, asking `produce(name)` for each
    tensor in order; return the index (also written as model.safetensors.index.json)."""
    from safetensors.torch import save_file

    n = len(shards)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name in names:
            t = produce(name)
            tensors[name] = t
            total += t.numel() * t.element_size()
            weight_map[name] = file
        save_file(tensors, str(Path(directory) / file), metadata={"format": "pt"})
        del tensors
        on_shard(i + 1, n)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(directory) / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def write_model_configs(out: Path, config: dict, tokens: dict) -> None:
    """config.json, and generation_config.json with the known special token ids."""
    (Path(out) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {k: v for k, v in tokens.items() if v is not None}
    (Path(out) / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
