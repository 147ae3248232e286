"""Bytes per GPU of a training or evaluation process, and host bytes of a checkpoint save.

Weights, gradients and optimizer state follow what our build allocates (model/build.py): the
parameters in the training dtype; megatron DDP's gradient buffer in fp32 (grad_reduce_in_fp32);
Adam's two moments in fp32 plus an fp32 master copy of bf16 parameters. The distributed
optimizer shards the moments and master copies over the data-parallel group (experts: over the
expert-data-parallel group). tests/planner/test_memory.py checks these against the tensors torch
allocates for the tiny models.

Activations are itemised per layer below (what autograd keeps for the backward pass), after
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") but for
our layers: grouped-query attention, SwiGLU, routed experts, and flash attention on GPU (no
s x s score matrix) or megatron's unfused attention on CPU. They are predictions; the README
compares them with Megatron-LM's published formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from nemo_btx.config.schema import ModelConfig, ParallelConfig
from nemo_btx.config.validate import etp_of, min_world_size
from nemo_btx.planner.params import RankParams, kv_channels, padded_vocab_size, rank_params

GB = 1e9
GRAD_BYTES = 4  # megatron DDP's grad buffer: grad_reduce_in_fp32=True (model/build.py)
ADAM_BYTES = 8  # exp_avg and exp_avg_sq in fp32


@dataclass(frozen=True)
class Layout:
    """A ParallelConfig with its world size resolved, and the data-parallel sizes it implies."""

    parallel: ParallelConfig
    world: int

    @property
    def dp(self) -> int:
        p = self.parallel
        return self.world // (p.tp * p.pp * p.cp)

    @property
    def edp(self) -> int:
        """Data-parallel size of the expert parameters."""
        p = self.parallel
        return self.world // (etp_of(p) * p.ep * p.pp)

    @classmethod
    def of(cls, p: ParallelConfig, world: int = 0) -> "Layout":
        return cls(p, world or p.world_size or min_world_size(p))


def param_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def state_bytes(params: RankParams, layout: Layout, precision: str,
                distributed_optimizer: bool) -> Dict[str, float]:
    """Weights, gradients and optimizer state of one rank, in bytes."""
    master = 4 if precision == "bf16" else 0  # fp32 copies of bf16 weights
    optim = ADAM_BYTES + master
    if distributed_optimizer:
        optimizer = optim * (params.dense / layout.dp + params.expert / layout.edp)
    else:
        optimizer = optim * params.total
    return {"weights": param_bytes(precision) * params.total,
            "gradients": GRAD_BYTES * params.total,
            "optimizer": optimizer}


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one rank for one micro-batch, by part."""

    per_layer: float
    """One transformer layer as stored for its backward pass (after recomputation)."""
    recompute_peak: float
    """Extra bytes while one recomputed layer's activations exist again (full recomputation)."""
    embedding: float
    """The first stage: the embedding's output."""
    output: float
    """The last stage: final norm, output layer input, logits and the loss's fp32 softmax."""


def activations(m: ModelConfig, p: ParallelConfig, micro_batch: int, precision: str,
                recompute: str, flash: bool) -> Activations:
    """Bytes autograd keeps per micro-batch on one rank; `flash`: fused attention (TE on GPU)."""
    act = param_bytes(precision)
    s = m.seq_length // p.cp
    b, h, t = micro_batch, m.hidden_size, p.tp
    sp = p.sequence_parallel if p.sequence_parallel is not None else (t > 1 and m.moe.num_experts)
    outside = t if sp and t > 1 else 1  # tensors outside the TP regions are split only with SP
    heads, d = m.num_attention_heads, kv_channels(m)
    groups = m.num_query_groups or heads
    sbh = s * b * h * act
    drop = 2 * s * b * h / outside if m.hidden_dropout > 0 else 0  # two 1-byte masks

    # Attention: norm input, QKV input (norm output), q/k/v, the core attention's stored
    # state, the projection input (the context).
    qkv = s * b * (heads + 2 * groups) * d * act / t
    if flash:
        core = s * b * heads * 4 / t  # the softmax's log-sum-exp per row (fp32)
    else:
        core = heads * s * s * b * act / t  # the softmax output
        if m.attention_dropout > 0:
            core += heads * s * s * b / t  # its dropout mask (1 byte)
    context = s * b * heads * d * act / t
    attention = 2 * sbh / outside + qkv + context
    if recompute != "selective":
        attention += core  # selective recomputation redoes the core attention from q, k, v

    # FFN: norm input, then the MLP (or the routed experts) on the norm output.
    gated = 2 if m.activation == "swiglu" else 1
    f = m.ffn_hidden_size
    if m.moe.num_experts is None:
        mlp = sbh / outside + s * b * (gated + 1) * f * act / t + sbh / outside
    else:
        k, etp, experts = m.moe.router_topk, etp_of(p), m.moe.num_experts
        tokens = s * b / outside  # tokens this rank routes (SP splits them over TP)
        router = tokens * experts * 4 * 2  # fp32 logits and probabilities
        # Experts see each routed token once per chosen expert, gathered over the expert TP
        # group: their input, fc1 output, activation output and output (for the combine).
        routed = tokens * k
        expert = routed * (etp * h + (gated + 1) * f + h) * act
        mlp = sbh / outside + router + expert
    per_layer = attention + mlp + drop  # (the residual adds keep nothing for the backward)

    if recompute == "full":
        stored = sbh / outside  # only each layer's input is kept; the rest is recomputed
        peak = per_layer
        per_layer = stored
    else:
        peak = 0.0
    vocab = padded_vocab_size(m, t) / t
    embedding = sbh / outside
    output = sbh / outside * 2 + s * b * vocab * (act + 4)
    return Activations(per_layer=per_layer, recompute_peak=peak, embedding=embedding, output=output)


def in_flight(p: ParallelConfig, num_microbatches: int) -> float:
    """Micro-batches whose activations the first pipeline stage holds at once (1F1B warm-up;
    interleaving adds (pp-1)/(pp*vp) of a stage's worth). Without PP, one: each micro-batch's
    backward frees it before the next forward."""
    if p.pp == 1:
        return 1.0
    vp = p.vp or 1
    held = p.pp * (1 + (p.pp - 1) / (p.pp * vp)) if vp > 1 else float(p.pp)
    return min(held, float(num_microbatches))


@dataclass(frozen=True)
class TrainingMemory:
    """Per-GPU bytes of a training process on its most loaded pipeline stage."""

    weights: float
    gradients: float
    optimizer: float
    optimizer_unsharded: float
    """The optimizer state without the distributed optimizer (for the plan's comparison)."""
    activations: float
    overhead: float
    pp_rank: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead


def training_memory(m: ModelConfig, layout: Layout, *, precision: str, micro_batch: int,
                    global_batch: int, recompute: str, flash: bool,
                    overhead: float) -> TrainingMemory:
    """The largest per-GPU total over the pipeline stages."""
    p = layout.parallel
    microbatches = max(1, global_batch // (micro_batch * layout.dp))
    act = activations(m, p, micro_batch, precision, recompute, flash)
    layers = m.num_layers // p.pp
    flight = in_flight(p, microbatches)
    best = None
    for pp_rank in range(p.pp):
        params = rank_params(m, p, pp_rank)
        state = state_bytes(params, layout, precision, p.distributed_optimizer)
        plain = state_bytes(params, layout, precision, False)
        # Stage r holds (pp - r) micro-batches in 1F1B; the first holds the most.
        held = flight if pp_rank == 0 else max(1.0, flight * (p.pp - pp_rank) / p.pp)
        a = held * layers * act.per_layer + act.recompute_peak
        if pp_rank == 0:
            a += held * act.embedding
        if pp_rank == p.pp - 1:
            a += act.output
        mem = TrainingMemory(weights=state["weights"], gradients=state["gradients"],
                             optimizer=state["optimizer"], optimizer_unsharded=plain["optimizer"],
                             activations=a, overhead=overhead, pp_rank=pp_rank)
        if best is None or mem.total > best.total:
            best = mem
    return best


def inference_memory(m: ModelConfig, layout: Layout, *, precision: str, batch: int,
                     overhead: float) -> Dict[str, float]:
    """Per-GPU bytes of evaluation: the weights, the KV cache of `batch` full-length sequences,
    and one micro-batch of logits."""
    p = layout.parallel
    params = max((rank_params(m, p, r) for r in range(p.pp)), key=lambda r: r.total)
    act = param_bytes(precision)
    groups = m.num_query_groups or m.num_attention_heads
    kv = 2 * (m.num_layers // p.pp) * batch * m.seq_length * groups * kv_channels(m) * act / p.tp
    logits = batch * m.seq_length * padded_vocab_size(m, p.tp) / p.tp * 4
    return {"weights": params.total * act, "kv_cache": kv, "logits": logits, "overhead": overhead}


def checkpoint_host_bytes(m: ModelConfig, layout: Layout, *, precision: str, ranks_per_node: int,
                          gather: str = "dp0") -> float:
    """Host memory the first node needs while a training checkpoint is saved.

    megatron-core's torch_dist writer stages every tensor a rank writes in host memory; a
    replicated tensor is written by its data-parallel rank 0 only. With the distributed
    optimizer the state is written per model tensor (resumable at any layout), so the shards
    are first gathered: onto data-parallel rank 0 (train.optimizer_save_gather=dp0) or onto
    every rank (all). Rank r of a node: tp, cp, dp, pp in megatron-core's order (experts:
    etp, ep, edp, pp)."""
    p = layout.parallel
    params = rank_params(m, p, 0)
    optim = ADAM_BYTES + (4 if precision == "bf16" else 0)
    cp, etp = p.cp, etp_of(p)
    everyone = p.distributed_optimizer and gather == "all"  # every rank holds its gathered state
    total = 0.0
    for r in range(min(ranks_per_node, layout.world)):
        dense_dp0 = (r // (p.tp * cp)) % layout.dp == 0
        expert_dp0 = (r // (etp * p.ep)) % layout.edp == 0
        total += dense_dp0 * params.dense * param_bytes(precision)
        total += expert_dp0 * params.expert * param_bytes(precision)
        total += (dense_dp0 or everyone) * params.dense * optim + (expert_dp0 or everyone) * params.expert * optim
    return total
