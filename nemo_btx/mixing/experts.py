"""Which source FFN units make up each MoE expert: the one place mix variants differ.

An MoE expert is described as a list of `Segment`s, contiguous ranges of a dense source's
FFN units (a unit = one row of the SwiGLU gate, the same row of the up projection, and the same
column of fc2). Every variant (BTX, split experts, blended experts, sparse upcycling) is only a
different list; the converter that reads slices and writes the MoE knows nothing else. That
keeps `mix` and `upcycle` one mechanism, and makes each variant testable without torch.

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
from typing import List

from nemo_btx.errors import ConfigError


@dataclass(frozen=True)
class Segment:
    """FFN units [start, start + length) of source `source` (an index into the plan's sources)."""

    source: int
    start: int
    length: int


ExpertLayout = List[List[Segment]]
"""One list of segments per MoE expert, in expert order; segments are concatenated."""


def standard(num_sources: int, ffn: int) -> ExpertLayout:
    """BTX: expert i is source i's whole FFN."""
    return [[Segment(s, 0, ffn)] for s in range(num_sources)]


def split(num_sources: int, ffn: int, chunks: int) -> ExpertLayout:
    """Split experts: expert s*C + c is chunk c of source s."""
    if chunks < 1:
        raise ConfigError("mix.split_experts", chunks, "must be an integer >= 1")
    if ffn % chunks:
        raise ConfigError("mix.split_experts", chunks,
                          f"must divide model.ffn_hidden_size={ffn} (each expert FFN is cut into "
                          "equal chunks)")
    width = ffn // chunks
    return [[Segment(s, c * width, width)] for s in range(num_sources) for c in range(chunks)]


def blended(num_sources: int, ffn: int) -> ExpertLayout:
    """Blended experts: expert j = chunk (j + s) mod N of every source s, in source order."""
    if num_sources < 2:
        raise ConfigError("mix.blended", True, "blending needs at least two sources")
    if ffn % num_sources:
        raise ConfigError("mix.blended", True,
                          f"the number of sources ({num_sources}) must divide "
                          f"model.ffn_hidden_size={ffn}")
    width = ffn // num_sources
    return [[Segment(s, ((j + s) % num_sources) * width, width) for s in range(num_sources)]
            for j in range(num_sources)]


def upcycle(num_experts: int, ffn: int) -> ExpertLayout:
    """Sparse upcycling: every expert is a copy of source 0's FFN."""
    if num_experts < 1:
        raise ConfigError("model.moe.num_experts", num_experts, "must be an integer >= 1")
    return [[Segment(0, 0, ffn)] for _ in range(num_experts)]


def expert_ffn_size(layout: ExpertLayout) -> int:
    """FFN width of every expert (all experts of one MoE layer have the same width)."""
    widths = {sum(seg.length for seg in expert) for expert in layout}
    assert len(widths) == 1, f"experts of different widths: {sorted(widths)}"
    return widths.pop()


def pieces(expert: List[Segment], start: int, length: int):
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
