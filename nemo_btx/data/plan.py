"""The data stage as pieces and units, decided from the config and the inputs' sizes alone.

A domain's input is cut into **pieces** (one chunk of `data.chunk_size` input bytes each,
nemo_btx/data/readers.py): a piece is what one worker tokenizes into one partial dataset, and
pieces are merged in their order, so the output does not depend on how many workers or units
did the work. Consecutive pieces are grouped into **units** of about `data.unit_size` bytes:
one process of `nemo-btx run`, one Slurm array task of `nemo-btx launch`, with its own
completion markers (one per piece). A builtin corpus, or a user domain with a cap
(`max_documents`, `data.max_chars_per_domain`), is one piece read in order: a cap is a prefix
of the domain's stream. A domain given as an existing megatron dataset (`prefix`) has no pieces.

Planning reads only file sizes and parquet footers: `run`, `launch` and the login node see
the same units without reading a corpus. No torch, no megatron.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.config.sizes import parse_size
from nemo_btx.data import corpora, documents, readers
from nemo_btx.errors import ConfigError

#: Bumped when the bytes written for the same input change (encoding, partial format).
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Piece:
    """One chunk of one domain: what a worker tokenizes into one partial dataset."""

    domain: str
    index: int
    """Position in the domain: partials are merged in this order."""
    chunk: Optional[readers.Chunk]
    """None: the domain's whole stream, read in order (builtin corpus or a capped domain)."""
    nbytes: int
    """Input bytes (for progress and for grouping into units); a builtin stream: its cap."""

    @property
    def id(self) -> str:
        return f"{self.index:06d}"

    def describe(self) -> str:
        return self.chunk.describe() if self.chunk is not None else f"the {self.domain} stream"


@dataclass
class DomainPlan:
    source: corpora.DomainSource
    pieces: List[Piece] = field(default_factory=list)
    units: List[Tuple[int, int]] = field(default_factory=list)
    """[start, stop) piece indices of each unit."""
    prefix: Optional[str] = None
    valid_prefix: Optional[str] = None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def external(self) -> bool:
        """An existing megatron dataset: checked and read in place, nothing tokenized."""
        return self.prefix is not None

    def unit_pieces(self, k: int) -> List[Piece]:
        start, stop = self.units[k]
        return self.pieces[start:stop]

    def unit_names(self) -> List[str]:
        return [f"{self.name}:{k}" for k in range(len(self.units))]


def sizes(cfg: ExperimentConfig) -> Tuple[int, int, int]:
    """(chunk, unit, buffer) sizes in bytes, each named in its error."""
    out = []
    for key in ("chunk_size", "unit_size", "buffer_size"):
        value = getattr(cfg.data, key)
        try:
            n = parse_size(value)
        except ValueError as err:
            raise ConfigError(f"data.{key}", value, str(err)) from None
        if n < 1:
            raise ConfigError(f"data.{key}", value, "must be at least 1 byte")
        out.append(n)
    return out[0], out[1], out[2]


def plan_data(cfg: ExperimentConfig) -> List[DomainPlan]:
    """Every domain's pieces and units, in `data.domains` order."""
    chunk_bytes, unit_bytes, _ = sizes(cfg)
    out = []
    for src, dom in zip(corpora.resolve_sources(cfg.data), cfg.data.domains):
        plan = DomainPlan(src, prefix=dom.prefix, valid_prefix=dom.valid_prefix)
        if plan.external:
            out.append(plan)
            continue
        capped = src.max_documents is not None or cfg.data.max_chars_per_domain is not None
        if src.builtin or capped:
            cap = cfg.data.max_chars_per_domain or sum(f.stat().st_size for f in src.files)
            plan.pieces = [Piece(src.name, 0, None, int(cap))]
        else:
            chunks = readers.plan_chunks([str(f) for f in src.files], chunk_bytes)
            plan.pieces = [Piece(src.name, i, c, c.nbytes) for i, c in enumerate(chunks)]
        plan.units = group(plan.pieces, unit_bytes)
        out.append(plan)
    return out


def group(pieces: List[Piece], unit_bytes: int) -> List[Tuple[int, int]]:
    """Consecutive pieces into units of about `unit_bytes` (every unit at least one piece)."""
    units, start, size = [], 0, 0
    for i, piece in enumerate(pieces):
        if i > start and size + piece.nbytes > unit_bytes:
            units.append((start, i))
            start, size = i, 0
        size += piece.nbytes
    if pieces:
        units.append((start, len(pieces)))
    return units


def find_unit(plans: List[DomainPlan], name: str) -> Tuple[DomainPlan, int]:
    """`<domain>:<k>` -> (domain plan, k); a ConfigError lists the units that exist."""
    domain, _, k = name.rpartition(":")
    for plan in plans:
        if plan.name == domain and k.isdigit() and int(k) < len(plan.units):
            return plan, int(k)
    known = [u for p in plans for u in p.unit_names()]
    raise ConfigError("data.unit", name, f"must be one of {', '.join(known) or '(no tokenize units)'}")


# ------------------------------------------------------------------------------ fingerprints

def settings(cfg: ExperimentConfig, domain: str) -> dict:
    """What, besides the input and the tokenizer, decides a piece's bytes."""
    d = cfg.data
    return {"split": {"seed": d.seed, "valid_fraction": d.valid_fraction, "domain": domain,
                      "version": documents.SPLIT_VERSION},
            "dedup": d.dedup, "skip_bad_records": d.skip_bad_records, "format": FORMAT_VERSION}


def piece_fingerprint(cfg: ExperimentConfig, plan: DomainPlan, piece: Piece, tokenizer_sha: str) -> dict:
    """Everything that decides a piece's partial dataset: equal fingerprints mean skip."""
    src = plan.source
    if piece.chunk is not None:
        inputs = {"chunk": readers.input_fingerprint(piece.chunk), "text_key": src.text_key}
    else:
        inputs = {"source": src.provenance, "text_key": src.text_key,
                  "max_documents": src.max_documents, "max_chars": cfg.data.max_chars_per_domain}
    return {"piece": piece.id, "inputs": inputs, "tokenizer": tokenizer_sha, **settings(cfg, plan.name)}


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
