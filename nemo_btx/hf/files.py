"""safetensors in and out.

Reading: a Hugging Face directory holds `model.safetensors`, or shards listed in
`model.safetensors.index.json` (`weight_map`: tensor -> file). Files are opened with
`safe_open`, which maps them, so a tensor is read only when asked for.

Writing: tensors are assigned to shards by their sizes before anything is read (the names
`model-0000i-of-0000n.safetensors` need the count), then each shard is filled from a producer
one tensor at a time and written, so at most one shard's tensors are in memory.
`model.safetensors.index.json` lists them, as `save_pretrained` does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Tuple

import torch

from nemo_btx.errors import BtxError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text) -> int:
    """'5GB' -> 5_000_000_000 (HF's decimal units; KiB/MiB/GiB are binary); a number is bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class HFReader:
    """Lazy access to the tensors of a Hugging Face model directory."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
        elif (self.dir / SINGLE).is_file():
            weight_map = None
        else:
            others = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt*"))
            raise BtxError(f"{self.dir}: no {SINGLE} or {INDEX}"
                           + (f" (found {', '.join(others[:3])}: only safetensors checkpoints "
                              "import; save the model with save_pretrained(safe_serialization=True))"
                              if others else ""))
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self._handles = {}
        self._headers: Dict[str, tuple] = {}
        self._where: Dict[str, str] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise BtxError(f"{path}: missing (listed in {INDEX})")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # a truncated or foreign file
                raise BtxError(f"{path}: not a readable safetensors file ({err})") from None
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name
        if weight_map:
            for key, name in weight_map.items():
                if self._where.get(key) != name:
                    raise BtxError(f"{self.dir / INDEX}: lists {key!r} in {name}, which does not hold it")

    def names(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handles[self._where[name]].get_slice(name).get_dtype()
        if code not in _ST_DTYPES:
            raise BtxError(f"{self.dir}: tensor {name!r} is stored as {code}; only F32/BF16/F16 import")
        return _ST_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def read(self, name: str) -> torch.Tensor:
        """`name` read into a tensor of its own with plain reads, not through the file mapping
        `get` uses: pages of a mapping stay in the process's RSS until the file is closed, so a
        streaming pass over whole models would end up holding them all."""
        file = self._where[name]
        if file not in self._headers:
            with open(self.dir / file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[file] = (8 + n, json.loads(f.read(n)))
        start, header = self._headers[file]
        info = header[name]
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        with open(self.dir / file, "rb", buffering=0) as f:
            f.seek(start + begin)
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise BtxError(f"{self.dir / file}: truncated inside tensor {name!r}")
                done += got
        if info["dtype"] not in _ST_DTYPES:
            raise BtxError(f"{self.dir}: tensor {name!r} is stored as {info['dtype']}")
        return buf.view(_ST_DTYPES[info["dtype"]]).view(info["shape"])


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


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


def write_shards(directory: Path, shards: List[List[str]], produce: Callable[[str], torch.Tensor],
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


_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


def stream_shards(directory: Path, shards: List[List[str]], meta: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]],
                  produce: Callable[[str], torch.Tensor],
                  *, on_shard: Callable[[int, int], None] = lambda i, n: None) -> dict:
    """Like `write_shards`, but each tensor is written to its file as soon as it is produced:
    the header (names, dtypes, shapes, offsets: all known from `meta` beforehand) goes first,
    then the tensors' bytes in order. Memory: one tensor, not one shard. The files are what
    `safetensors.torch.save_file` writes (8-byte header length, JSON header padded with spaces
    to a multiple of 8, the data in header order)."""
    n = len(shards)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            dtype, shape = meta[name]
            size = torch.tensor([], dtype=dtype).element_size()
            for d in shape:
                size *= d
            header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(Path(directory) / file, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name in names:
                t = produce(name)
                dtype, shape = meta[name]
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise BtxError(f"{name}: produced {t.dtype} {list(t.shape)}, "
                                   f"planned {dtype} {list(shape)}")
                t = t.contiguous()
                f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
                total += t.numel() * t.element_size()
                weight_map[name] = file
                del t
        on_shard(i + 1, n)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(directory) / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def write_model_configs(out: Path, config: dict, tokens: dict) -> None:
    """config.json, and generation_config.json with the known special token ids."""
    import json

    (Path(out) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {k: v for k, v in tokens.items() if v is not None}
    (Path(out) / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
