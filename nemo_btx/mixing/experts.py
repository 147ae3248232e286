"""The expert table: which source FFN units make up each MoE expert (no torch).

The table is part of the merge recipe (`recipe.py`) and is decided from the config alone: each
expert is a tuple of `Chunk`s, "chunk c of the C equal chunks of source s's FFN". Once the FFN
width F is known (the config for the megatron mix, the sources' config.json for the Hugging
Face merge), `segments` turns it into `Segment`s, contiguous ranges of FFN units (a unit = one
row of the SwiGLU gate, the same row of the up projection, and the same column of fc2). Every
variant (BTX, split experts, blended experts, sparse upcycling) is only a different table;
the writers that read slices and write the MoE know nothing else. That keeps `mix`, `upcycle`
and the Mixtral merge one mechanism, and makes each variant testable without torch.

Ablations of the BTX paper (Sukhbaatar et al., 2024), as implemented here:

* **split experts** (`mix.split_experts=C`): each source FFN is cut into C contiguous chunks,
  each chunk becomes one expert: N*C experts of FFN size F/C, and top-k becomes k*C so a token
  still touches the same number of FFN units. The chunks of one source concatenate back to
  its FFN. With the paper's routing (softmax over the chosen k), a token routed to all C chunks
  of one source with equal scores gets that source's FFN output scaled by 1/C: split experts do
  not start from the dense function (our tests check exactly that relation).
* **blended experts** (`mix.blended=true`): our reading of the paper's variant: every expert
  is a blend of all domain experts, made of one 1/N chunk of each source FFN, so no expert keeps
  a domain identity (the ablation asks whether that identity matters). The paper fixes only that
  each new expert takes one chunk from every source (the search tool held no copy of its text to
  check further); which chunk goes where is our choice: expert j takes chunk (j + s) mod N of
  source s (a Latin square). Every (source, chunk) pair is used exactly once, as with the
  "j-th chunk of every source" reading, and in addition each expert is a permutation of whole
  FFN units, so identical sources give N copies of the dense FFN: like plain BTX, blending then
  starts exactly from the dense model's function instead of from N scaled fragments.
* **sparse upcycling** (`nemo-btx upcycle`): one source (the seed), its whole FFN copied into
  every expert (Komatsuzaki et al., 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

from nemo_btx.errors import ConfigError


@dataclass(frozen=True)
class Chunk:
    """Chunk `index` of the `count` equal chunks of source `source`'s FFN (an index into the
    recipe's sources); count 1 = the whole FFN."""

    source: int
    index: int = 0
    count: int = 1


ExpertTable = Tuple[Tuple[Chunk, ...], ...]
"""One tuple of chunks per MoE expert, in expert order; the chunks are concatenated."""


def standard(num_sources: int) -> ExpertTable:
    """BTX: expert i is source i's whole FFN."""
    return tuple((Chunk(s),) for s in range(num_sources))


def split(num_sources: int, chunks: int) -> ExpertTable:
    """Split experts: expert s*C + c is chunk c of source s."""
    if not isinstance(chunks, int) or chunks < 1:
        raise ConfigError("mix.split_experts", chunks, "must be an integer >= 1")
    return tuple((Chunk(s, c, chunks),) for s in range(num_sources) for c in range(chunks))


def blended(num_sources: int) -> ExpertTable:
    """Blended experts: expert j = chunk (j + s) mod N of every source s, in source order."""
    if num_sources < 2:
        raise ConfigError("mix.blended", True, "blending needs at least two sources")
    return tuple(tuple(Chunk(s, (j + s) % num_sources, num_sources) for s in range(num_sources))
                 for j in range(num_sources))


def upcycle(num_experts: int) -> ExpertTable:
    """Sparse upcycling: every expert is a copy of source 0's FFN."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ConfigError("model.moe.num_experts", num_experts, "must be an integer >= 1")
    return tuple((Chunk(0),) for _ in range(num_experts))


@dataclass(frozen=True)
class Segment:
    """FFN units [start, start + length) of source `source` (an index into the recipe's sources)."""

    source: int
    start: int
    length: int


ExpertLayout = List[List[Segment]]
"""One list of segments per MoE expert, in expert order; segments are concatenated."""


def segments(table: ExpertTable, ffn: int) -> ExpertLayout:
    """The table in FFN units of sources `ffn` units wide (every chunk count divides `ffn`:
    the recipe checks that first, naming the setting)."""
    out = []
    for expert in table:
        segs = []
        for c in expert:
            assert ffn % c.count == 0, (ffn, c)
            width = ffn // c.count
            segs.append(Segment(c.source, c.index * width, width))
        out.append(segs)
    return out


def expert_ffn_size(layout: ExpertLayout) -> int:
    """FFN width of every expert (all experts of one MoE layer have the same width)."""
    widths = {sum(seg.length for seg in expert) for expert in layout}
    assert len(widths) == 1, f"experts of different widths: {sorted(widths)}"
    return widths.pop()


def pieces(expert: List[Segment], start: int, length: int) -> Iterator[Tuple[int, int, int, int]]:
    """Map expert FFN units [start, start+length) onto its segments.

    Yields (source, source_unit, expert_unit, n): units source_unit.. of `source` fill expert
    units expert_unit.. (n of them). Used to turn a TP-sliced expert shard into source reads.
    """
    pos = 0
    end = start + length
    for seg in expert:
        lo, hi = max(start, pos), min(end, pos + seg.length)
        if lo < hi:
            yield seg.source, seg.start + (lo - pos), lo, hi - lo
        pos += seg.length
