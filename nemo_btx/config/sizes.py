"""Sizes written in configs (`hf.max_shard_size=5GB`), read the way Hugging Face reads them."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text) -> int:
    """'5GB' -> 5_000_000_000 (HF's decimal units; KiB/MiB/GiB are binary); a number is bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
