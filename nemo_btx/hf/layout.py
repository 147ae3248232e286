"""Which Hugging Face tensor is which part of which megatron-core tensor, and how to cut and join.

One table (`pieces`) drives both directions. Each `Piece` is one Hugging Face tensor and says
where it lives in the megatron-core checkpoint: a global key, the leading indices of the
stacked axes (layer, and expert for MoE weights) and which part of that per-layer tensor it is:

    all     the whole tensor (norms, o_proj = linear_proj, down_proj = linear_fc2, router)
    q k v   megatron's fused linear_qkv (weight, and Qwen2's bias), laid out per query group g as
            [q heads of group g; k_g; v_g] (num_groups x (heads/groups + 2) x head_dim rows);
            HF q/k/v_proj rows are head-major, and query head i belongs to kv head
            i // (heads/groups) in both, so this is a pure reshuffle of rows
    gate up SwiGLU's fused linear_fc1 = [gate; up] (HF gate_proj/up_proj, Mixtral w1/w3)
    vocab   the embedding and output layer: megatron pads the vocabulary up to a multiple of
            make_vocab_size_divisible_by x TP; export drops those rows, import pads with zeros

No other transform is needed. HF Llama applies RoPE with rotate_half on the two halves of each
head (the checkpoints on the hub are already permuted for it), which is megatron-core's default
non-interleaved rotary; RMSNorm weights are used as they are (x * rsqrt(mean x^2 + eps) * w on
both sides). The logit tests check all of this end to end.

Norm names depend on the layer spec: the local and TE dense specs store the pre-attention norm
inside linear_qkv and the pre-MLP norm inside linear_fc1 (`*.layer_norm_weight`); an MoE layer
built with the TE spec stores `pre_mlp_layernorm.weight` instead. Whichever the checkpoint has
is used (`resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Tuple

from nemo_btx.config.schema import ModelConfig
from nemo_btx.errors import CheckpointError

if TYPE_CHECKING:
    import torch

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
QKV_BIAS = "decoder.layers.self_attention.linear_qkv.bias"
Q_NORM = "decoder.layers.self_attention.q_layernorm.weight"
K_NORM = "decoder.layers.self_attention.k_layernorm.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
ROUTER = "decoder.layers.mlp.router.weight"
EXPERT_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
#: Alternative names of the same norm, in preference order (see the module docstring).
ATTN_NORM = ("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
             "decoder.layers.input_layernorm.weight")
MLP_NORM = ("decoder.layers.mlp.linear_fc1.layer_norm_weight",
            "decoder.layers.pre_mlp_layernorm.weight")
ALIASES = {name: names for names in (ATTN_NORM, MLP_NORM) for name in names}


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor as (part of) one megatron-core tensor."""

    name: str
    """Hugging Face tensor name."""
    shape: Tuple[int, ...]
    """Its shape in the Hugging Face checkpoint."""
    key: str
    """Global key of the megatron-core tensor (layers stacked on the leading axes)."""
    lead: Tuple[int, ...]
    """Indices on the stacked axes: (layer,), (layer, expert) or () for non-layer tensors."""
    part: str
    """all | q | k | v | gate | up | vocab."""


def _dims(m: ModelConfig) -> Tuple[int, int, int, int]:
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    head_dim = m.kv_channels or m.hidden_size // heads
    return heads, groups, head_dim, m.hidden_size


#: An MoE layer's Hugging Face names, by model_type: (router, expert prefix, gate, up, down).
MOE_NAMES = {"mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.", "w1", "w3", "w2"),
             "qwen3_moe": ("mlp.gate.weight", "mlp.experts.", "gate_proj", "up_proj", "down_proj")}


def moe_names(m: ModelConfig) -> Tuple[str, str, str, str, str]:
    from nemo_btx.hf.config import MOE_CLASS

    return MOE_NAMES[MOE_CLASS[m.family][1]]


def pieces(m: ModelConfig, *, norms: Tuple[str, str] = (ATTN_NORM[0], MLP_NORM[0])) -> List[Piece]:
    """Every Hugging Face tensor of the model, in writing order (pieces of one megatron
    tensor are adjacent, so an exporter that caches the last tensor it read reads each once).

    Dense models map to their family's names (Llama's, plus Qwen2's q/k/v biases and Qwen3's
    q/k norms); MoE models to Mixtral's or Qwen3-MoE's (`MOE_NAMES`).
    `norms` are the checkpoint's names of the pre-attention and pre-MLP norms.
    """
    heads, groups, hd, h = _dims(m)
    f, v = m.ffn_hidden_size, m.vocab_size
    out = [Piece("model.embed_tokens.weight", (v, h), EMBED, (), "vocab")]
    for i in range(m.num_layers):
        p, lead = f"model.layers.{i}.", (i,)
        out += [Piece(p + "input_layernorm.weight", (h,), norms[0], lead, "all"),
                Piece(p + "self_attn.q_proj.weight", (heads * hd, h), QKV, lead, "q"),
                Piece(p + "self_attn.k_proj.weight", (groups * hd, h), QKV, lead, "k"),
                Piece(p + "self_attn.v_proj.weight", (groups * hd, h), QKV, lead, "v")]
        if m.add_qkv_bias:
            out += [Piece(p + "self_attn.q_proj.bias", (heads * hd,), QKV_BIAS, lead, "q"),
                    Piece(p + "self_attn.k_proj.bias", (groups * hd,), QKV_BIAS, lead, "k"),
                    Piece(p + "self_attn.v_proj.bias", (groups * hd,), QKV_BIAS, lead, "v")]
        if m.qk_layernorm:
            out += [Piece(p + "self_attn.q_norm.weight", (hd,), Q_NORM, lead, "all"),
                    Piece(p + "self_attn.k_norm.weight", (hd,), K_NORM, lead, "all")]
        out += [Piece(p + "self_attn.o_proj.weight", (h, heads * hd), PROJ, lead, "all"),
                Piece(p + "post_attention_layernorm.weight", (h,), norms[1], lead, "all")]
        if m.moe.num_experts is None:
            out += [Piece(p + "mlp.gate_proj.weight", (f, h), FC1, lead, "gate"),
                    Piece(p + "mlp.up_proj.weight", (f, h), FC1, lead, "up"),
                    Piece(p + "mlp.down_proj.weight", (h, f), FC2, lead, "all")]
            continue
        router, experts, gate, up, down = moe_names(m)
        out.append(Piece(p + router, (m.moe.num_experts, h), ROUTER, lead, "all"))
        for e in range(m.moe.num_experts):
            q = f"{p}{experts}{e}."
            out += [Piece(f"{q}{gate}.weight", (f, h), EXPERT_FC1, (i, e), "gate"),
                    Piece(f"{q}{up}.weight", (f, h), EXPERT_FC1, (i, e), "up"),
                    Piece(f"{q}{down}.weight", (h, f), EXPERT_FC2, (i, e), "all")]
    out.append(Piece("model.norm.weight", (h,), FINAL_NORM, (), "all"))
    if m.untie_embeddings_and_output_weights:
        out.append(Piece("lm_head.weight", (v, h), OUTPUT, (), "vocab"))
    return out


#: Buffers some older Llama checkpoints carry; recomputed by every implementation.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_tensors(reader, pieces: List[Piece], tied: bool, where) -> None:
    """`reader` (files.HFDir) holds exactly `pieces`, at their shapes (a tied checkpoint may
    lack lm_head), plus only buffers that are recomputed anyway."""
    names = set(reader.names())
    for p in pieces:
        name = "model.embed_tokens.weight" if (p.name == "lm_head.weight" and tied and p.name not in names) else p.name
        if name not in names:
            raise CheckpointError(f"{where}: has no tensor {name!r}")
        if reader.shape(name) != p.shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(reader.shape(name))}, "
                                  f"config.json implies {list(p.shape)}")
    known = {p.name for p in pieces}
    for name in sorted(names - known):
        if not name.endswith(_IGNORED_SUFFIXES):
            raise CheckpointError(f"{where}: tensor {name!r} has no megatron-core counterpart "
                                  "(not a plain checkpoint of its family)")


def resolve(keys: Iterable[str]) -> Tuple[str, str]:
    """The checkpoint's names of the pre-attention and pre-MLP norms."""
    keys = set(keys)
    found = []
    for names in (ATTN_NORM, MLP_NORM):
        have = [n for n in names if n in keys]
        if not have:
            raise CheckpointError(f"the checkpoint has none of the norm tensors {', '.join(names)}")
        found.append(have[0])
    return found[0], found[1]


def split(piece: Piece, full: "torch.Tensor", m: ModelConfig) -> "torch.Tensor":
    """The Hugging Face tensor `piece` cut out of its megatron-core per-layer tensor `full`."""
    if piece.part == "all":
        return full
    if piece.part == "vocab":
        return full[: m.vocab_size]
    if piece.part in ("gate", "up"):
        f = full.shape[0] // 2
        return full[:f] if piece.part == "gate" else full[f:]
    heads, groups, hd, _ = _dims(m)
    per_group, rest = heads // groups, tuple(full.shape[1:])  # rest: (hidden,) or () for a bias
    grouped = full.view(groups, per_group + 2, hd, *rest)
    if piece.part == "q":
        return grouped[:, :per_group].reshape(heads * hd, *rest)
    return grouped[:, per_group if piece.part == "k" else per_group + 1].reshape(groups * hd, *rest)


def join(parts: Dict[str, "torch.Tensor"], m: ModelConfig, padded_vocab: int) -> "torch.Tensor":
    """The megatron-core per-layer tensor made of its Hugging Face pieces (`part` -> tensor)."""
    import torch

    kinds = set(parts)
    if kinds == {"all"}:
        return parts["all"]
    if kinds == {"vocab"}:
        w = parts["vocab"]
        pad = w.new_zeros((padded_vocab - w.shape[0], *w.shape[1:]))
        return torch.cat([w, pad]) if pad.shape[0] else w
    if kinds == {"gate", "up"}:
        return torch.cat([parts["gate"], parts["up"]])
    if kinds == {"q", "k", "v"}:
        heads, groups, hd, _ = _dims(m)
        rest = tuple(parts["q"].shape[1:])  # (hidden,) for the weight, () for the bias
        q = parts["q"].view(groups, heads // groups, hd, *rest)
        k = parts["k"].view(groups, 1, hd, *rest)
        v = parts["v"].view(groups, 1, hd, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)
    raise AssertionError(f"no rule joins parts {sorted(kinds)}")
