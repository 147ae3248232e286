"""What happens to one document on its way into a dataset, decided per document.

A corpus of hundreds of GB is never held in memory, so nothing here may need the list of all
documents: the train/valid split is a pure function of the document's text, `data.seed` and
the domain (a hash), and the exact-duplicate filter keeps the digests of one chunk only.

- `held_out(text, ...)`: the hash of (seed, domain, text) as a number in [0, 1) below
  `data.valid_fraction`. Independent of order, workers and shards; a duplicate document always
  lands on the same side, so held-out perplexity never scores a document seen in training.
- `held_out_positions(n, ...)`: the same rule for documents known only by their position (an
  existing megatron dataset, `data.domains.<i>.prefix`).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import numpy as np

#: Changing anything below changes which documents are held out: part of every fingerprint.
SPLIT_VERSION = 2


def digest(text: str) -> bytes:
    """16 bytes that identify a document's text (exact duplicates have equal digests)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _fraction(key: bytes) -> float:
    h = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def split_value(text: str, *, seed: int, domain: str) -> float:
    """The document's place in [0, 1): held out when below `data.valid_fraction`."""
    return _fraction(f"nemo-btx-split-{seed}-{domain}\0".encode() + digest(text))


def held_out(text: str, *, seed: int, domain: str, fraction: float) -> bool:
    """Whether this document belongs to the validation split."""
    return split_value(text, seed=seed, domain=domain) < fraction


def one_each_side(values, fraction: float):
    """For a domain read as one stream (a builtin corpus, a capped domain: small by nature),
    the position of the one document to move so that both splits have a document, or None:
    with none held out, the one closest above the threshold joins valid; with all held out, the
    one closest below it joins train. A large domain is many pieces and keeps the plain rule
    (it has documents on both sides with certainty for any useful fraction)."""
    if len(values) < 2:
        return None
    held = [v < fraction for v in values]
    if not any(held):
        return min(range(len(values)), key=lambda i: values[i])
    if all(held):
        return max(range(len(values)), key=lambda i: values[i])
    return None


def held_out_positions(count: int, *, seed: int, domain: str, fraction: float) -> "np.ndarray":
    """For documents 0..count-1 of an existing dataset, known only by position: which belong to
    the validation split (a boolean array). A hash of (seed, domain) keys splitmix64 over the
    positions, vectorised: 50M documents take well under a second."""
    import numpy as np

    key = int.from_bytes(hashlib.blake2b(f"nemo-btx-split-{seed}-{domain}-doc".encode(),
                                         digest_size=8).digest(), "big")
    out = np.empty(count, dtype=bool)
    with np.errstate(over="ignore"):
        for start in range(0, count, 1 << 22):
            z = np.arange(start, min(count, start + (1 << 22)), dtype=np.uint64) + np.uint64(key)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            out[start:start + len(z)] = (z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53 < fraction
    return out


class Dedup:
    """Exact duplicates within one chunk (bounded memory: 16 bytes per document of the chunk)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seen: Optional[set] = set() if enabled else None
        self.dropped = 0

    def is_new(self, text: str) -> bool:
        if self.seen is None:
            return True
        d = digest(text)
        if d in self.seen:
            self.dropped += 1
            return False
        self.seen.add(d)
        return True
