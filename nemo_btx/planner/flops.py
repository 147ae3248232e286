"""Training FLOPs by formula, and what they cost in time on a GPU at an assumed utilisation.

One formula serves the compute ledger (training/loop.py, the compute-matched baselines) and the
planner, so a baseline's predicted budget is the one the run will give it.
"""

from __future__ import annotations

from typing import Optional

from nemo_btx.config.schema import ModelConfig
from nemo_btx.planner.params import kv_channels


def model_flops_per_token(m: ModelConfig, *, active_experts: Optional[int] = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), by formula.

    6*N for the matmul parameters that a token touches, plus attention scores (12*L*h*s). For
    MoE only the `router_topk` experts a token is routed to count, which is why BTX top-2 costs
    far less than running every expert (BTM).
    """
    h, L, s = m.hidden_size, m.num_layers, m.seq_length
    heads = m.num_attention_heads
    kv = (m.num_query_groups or heads) * kv_channels(m)
    attn = h * h * 2 + 2 * h * kv  # q, o + k, v
    ffn_one = h * m.ffn_hidden_size * (3 if m.activation == "swiglu" else 2)
    experts = 1
    if m.moe.num_experts is not None:
        experts = active_experts if active_experts is not None else m.moe.router_topk
    router = h * m.moe.num_experts if m.moe.num_experts else 0
    per_layer = attn + ffn_one * experts + router
    logits = h * m.vocab_size
    return 6.0 * (L * per_layer + logits) + 12.0 * L * h * s


def executed_flops_per_token(m: ModelConfig, recompute: str) -> float:
    """FLOPs the GPUs execute per token: recomputation runs part of the forward again (full:
    every layer's forward, +1/3 of the layers' share; selective: the attention scores)."""
    useful = model_flops_per_token(m)
    h, L, s = m.hidden_size, m.num_layers, m.seq_length
    scores = 12.0 * L * h * s
    if recompute == "full":
        return useful + (useful - 6.0 * h * m.vocab_size) / 3
    if recompute == "selective":
        return useful + scores / 3
    return useful


def mfu(m: ModelConfig, tokens_per_s_per_gpu: float, peak_flops: float) -> float:
    """Model FLOP utilisation: the useful training FLOPs per second of one GPU over its peak."""
    return model_flops_per_token(m) * tokens_per_s_per_gpu / peak_flops


def step_seconds(m: ModelConfig, tokens_per_step: int, gpus: int, *, peak_flops: float, mfu: float,
                 recompute: str = "none") -> float:
    """Seconds of one optimizer step of `tokens_per_step` tokens on `gpus` GPUs that reach `mfu`
    of `peak_flops` on the model's useful FLOPs (recomputation lowers what they reach)."""
    useful = model_flops_per_token(m) * tokens_per_step
    slowdown = executed_flops_per_token(m, recompute) / model_flops_per_token(m)
    return useful * slowdown / (gpus * peak_flops * mfu)
