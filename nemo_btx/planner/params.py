"""Parameters per rank, as megatron-core's GPTModel lays them out over TP/PP/EP/ETP.

What a rank holds depends only on its pipeline stage: tensor- and expert-parallel ranks of one
stage hold equal shares (the vocabulary is padded so that it splits evenly). The counts follow
the modules megatron-core builds for our Llama-style model (no biases but Qwen2's q/k/v ones, Qwen3's q/k
norms, RMSNorm or LayerNorm,
SwiGLU or GELU, RoPE or learned positions); tests/planner/test_params.py builds the real models
on the meta device at several layouts and compares every rank's count exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_btx.config.schema import ModelConfig, ParallelConfig
from nemo_btx.config.validate import etp_of


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Round the vocabulary up so the embedding splits evenly over TP (megatron's rule)."""
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-model.vocab_size // multiple) * multiple


@dataclass(frozen=True)
class RankParams:
    """Parameters one rank holds. `dense` are replicated over the data-parallel group (attention,
    norms, embeddings, routers, a dense FFN); `expert` over the smaller expert-data-parallel group
    (the MoE experts), which is what the distributed optimizer shards them over."""

    dense: int
    expert: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def kv_channels(m: ModelConfig) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def norm_params(m: ModelConfig) -> int:
    return m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)


def attention_params(m: ModelConfig, tp: int) -> int:
    """linear_qkv (query heads, then key and value per query group; Qwen2's biases) +
    linear_proj, TP-split; Qwen3's q/k norms (one weight per head dimension each) replicated."""
    d = kv_channels(m)
    groups = m.num_query_groups or m.num_attention_heads
    qkv = (m.num_attention_heads + 2 * groups) * d * (m.hidden_size + (1 if m.add_qkv_bias else 0))
    proj = m.num_attention_heads * d * m.hidden_size
    qk_norms = 2 * d if m.qk_layernorm else 0
    return (qkv + proj) // tp + qk_norms


def ffn_params(m: ModelConfig, tp: int) -> int:
    """One FFN (a dense MLP or one expert): fc1 (gate and up for SwiGLU) + fc2, TP-split."""
    fc1 = m.ffn_hidden_size * m.hidden_size * (2 if m.activation == "swiglu" else 1)
    return (fc1 + m.ffn_hidden_size * m.hidden_size) // tp


def layer_params(m: ModelConfig, p: ParallelConfig) -> RankParams:
    """One transformer layer on one rank."""
    dense = 2 * norm_params(m) + attention_params(m, p.tp)
    experts = m.moe.num_experts
    if experts is None:
        return RankParams(dense=dense + ffn_params(m, p.tp), expert=0)
    router = experts * m.hidden_size  # replicated on every TP rank
    return RankParams(dense=dense + router, expert=(experts // p.ep) * ffn_params(m, etp_of(p)))


def layers_per_stage(m: ModelConfig, p: ParallelConfig) -> int:
    """Layers on one pipeline rank (over all its virtual stages): megatron's even split."""
    return m.num_layers // p.pp


def rank_params(m: ModelConfig, p: ParallelConfig, pp_rank: int = 0) -> RankParams:
    """Parameters held by a rank of pipeline stage `pp_rank`."""
    layer = layer_params(m, p)
    n = layers_per_stage(m, p)
    dense, expert = n * layer.dense, n * layer.expert
    vocab = padded_vocab_size(m, p.tp) // p.tp * m.hidden_size
    first, last = pp_rank == 0, pp_rank == p.pp - 1
    if first:
        dense += vocab
        if m.position_embedding_type == "learned_absolute":
            dense += (m.max_position_embeddings or m.seq_length) * m.hidden_size
    if last:
        dense += norm_params(m)  # final norm
        # The output layer: its own weight when untied; a tied one is a second copy on the
        # last stage when that is not also the first (megatron keeps them in sync).
        if m.untie_embeddings_and_output_weights or not first:
            dense += vocab
    return RankParams(dense=dense, expert=expert)


def total_params(m: ModelConfig) -> int:
    """Parameters of the whole model (one copy, unpadded vocabulary)."""
    one = ParallelConfig()
    layer = layer_params(m, one)
    vocab = m.vocab_size * m.hidden_size * (2 if m.untie_embeddings_and_output_weights else 1)
    pos = (m.max_position_embeddings or m.seq_length) * m.hidden_size \
        if m.position_embedding_type == "learned_absolute" else 0
    return m.num_layers * layer.total + vocab + pos + norm_params(m)


def active_params(m: ModelConfig) -> int:
    """Parameters a token passes through: for an MoE, only its router_topk experts."""
    if m.moe.num_experts is None:
        return total_params(m)
    unused = m.moe.num_experts - m.moe.router_topk
    return total_params(m) - m.num_layers * unused * ffn_params(m, 1)
