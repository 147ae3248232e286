"""Checks that run before any process group, model or file is created.

Every failure is one `ConfigError` naming the dotted key, the value and what is allowed: a
layout that megatron-core would reject with an assert deep inside `initialize_model_parallel`
(or, worse, accept and compute something else) is caught here, on a login node, in milliseconds.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields, is_dataclass
from typing import Iterator, Optional, Tuple

from nemo_btx.config.schema import ExperimentConfig, ParallelConfig
from nemo_btx.errors import ConfigError


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _walk(obj, prefix: str = "") -> Iterator[Tuple[str, object, dict]]:
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            yield from _walk(value, key + ".")
        else:
            yield key, value, f.metadata


def check_choices(cfg) -> None:
    """Every field declared with `choice(...)` holds one of its allowed strings."""
    for key, value, meta in _walk(cfg):
        allowed = meta.get("choices")
        if allowed and value not in allowed:
            raise ConfigError(key, value, f"must be one of {', '.join(allowed)}")


def _positive(key: str, value: Optional[int], minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(key, value, f"must be an integer >= {minimum}")


def etp_of(p: ParallelConfig) -> int:
    """Expert tensor parallel size actually used (megatron-core defaults it to tp)."""
    return p.tp if p.etp is None else p.etp


def min_world_size(p: ParallelConfig) -> int:
    """Smallest process count the layout fits: both the dense and the expert grid must tile it."""
    return math.lcm(p.tp * p.pp * p.cp, etp_of(p) * p.ep * p.pp)


def resolve_world_size(p: ParallelConfig, env: Optional[dict] = None) -> int:
    """parallel.world_size, else the launcher's WORLD_SIZE, else the smallest layout that fits."""
    env = os.environ if env is None else env
    launched = env.get("WORLD_SIZE")
    if p.world_size is not None and launched is not None and int(launched) != p.world_size:
        raise ConfigError(
            "parallel.world_size", p.world_size,
            f"the launcher started {launched} processes (WORLD_SIZE); set them equal or leave it null",
        )
    if p.world_size is not None:
        return p.world_size
    if launched is not None:
        return int(launched)
    return min_world_size(p)


def sequence_parallel_of(cfg: ExperimentConfig) -> bool:
    """Sequence parallel actually used: explicit setting, else on for MoE with TP > 1."""
    p = cfg.parallel
    if p.sequence_parallel is not None:
        return bool(p.sequence_parallel) and p.tp > 1
    return p.tp > 1 and cfg.model.moe.num_experts is not None


def check_model(cfg: ExperimentConfig) -> None:
    m = cfg.model
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.num_query_groups", m.num_query_groups)
    _positive("model.kv_channels", m.kv_channels)
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", m.hidden_size,
                          f"must be a multiple of model.num_attention_heads={m.num_attention_heads} "
                          "(or set model.kv_channels)")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        raise ConfigError("model.num_query_groups", m.num_query_groups,
                          f"must divide model.num_attention_heads={m.num_attention_heads} "
                          f"(allowed: {_divisors(m.num_attention_heads)})")
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        raise ConfigError("model.max_position_embeddings", m.max_position_embeddings,
                          f"must be >= model.seq_length={m.seq_length}")
    moe = m.moe
    if moe.num_experts is not None:
        _positive("model.moe.num_experts", moe.num_experts)
        if not 1 <= moe.router_topk <= moe.num_experts:
            raise ConfigError("model.moe.router_topk", moe.router_topk,
                              f"must be between 1 and model.moe.num_experts={moe.num_experts}")
        if moe.router_topk == 1 and not moe.router_pre_softmax:
            raise ConfigError("model.moe.router_pre_softmax", moe.router_pre_softmax,
                              "top-1 routing needs softmax before top-k (true): a softmax over one "
                              "chosen logit is always 1 and gives the router no gradient")
        if moe.capacity_factor is not None and moe.capacity_factor <= 0:
            raise ConfigError("model.moe.capacity_factor", moe.capacity_factor,
                              "must be > 0, or null for no token dropping")
    if moe.aux_loss_coeff < 0:
        raise ConfigError("model.moe.aux_loss_coeff", moe.aux_loss_coeff, "must be >= 0")


def check_parallel(cfg: ExperimentConfig, world_size: int) -> None:
    """The layout rules megatron-core's parallel state and layers rely on."""
    m, p = cfg.model, cfg.parallel
    for name in ("tp", "pp", "cp", "ep"):
        _positive(f"parallel.{name}", getattr(p, name))
    _positive("parallel.vp", p.vp)
    _positive("parallel.etp", p.etp)
    _positive("parallel.world_size", world_size)
    etp = etp_of(p)
    groups = m.num_query_groups or m.num_attention_heads

    if m.num_attention_heads % p.tp:
        raise ConfigError("parallel.tp", p.tp,
                          f"must divide model.num_attention_heads={m.num_attention_heads} "
                          f"(allowed: {_divisors(m.num_attention_heads)})")
    if groups % p.tp:
        raise ConfigError("parallel.tp", p.tp,
                          f"must divide the query groups (model.num_query_groups={groups}; "
                          f"allowed: {_divisors(groups)})")
    if m.ffn_hidden_size % p.tp:
        raise ConfigError("parallel.tp", p.tp,
                          f"must divide model.ffn_hidden_size={m.ffn_hidden_size}")
    if m.num_layers % p.pp:
        raise ConfigError("parallel.pp", p.pp,
                          f"must divide model.num_layers={m.num_layers} "
                          f"(allowed: {_divisors(m.num_layers)})")
    if p.vp is not None and p.vp > 1:
        if p.pp == 1:
            raise ConfigError("parallel.vp", p.vp,
                              "virtual pipeline stages need parallel.pp > 1 (or set parallel.vp=null)")
        if m.num_layers % (p.pp * p.vp):
            raise ConfigError("parallel.vp", p.vp,
                              f"parallel.pp*parallel.vp must divide model.num_layers={m.num_layers} "
                              f"(pp={p.pp}; allowed vp: "
                              f"{_divisors(m.num_layers // p.pp)})")
    if p.cp > 1 and m.seq_length % (2 * p.cp):
        raise ConfigError("parallel.cp", p.cp,
                          f"2*parallel.cp must divide model.seq_length={m.seq_length}")
    if world_size % (p.tp * p.pp * p.cp):
        raise ConfigError("parallel.world_size", world_size,
                          f"must be a multiple of tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {p.tp * p.pp * p.cp}")

    moe = m.moe.num_experts
    if moe is None:
        if p.ep > 1:
            raise ConfigError("parallel.ep", p.ep,
                              "expert parallelism needs an MoE model (set model.moe.num_experts)")
        if p.etp is not None and p.etp != p.tp:
            raise ConfigError("parallel.etp", p.etp,
                              "expert tensor parallelism needs an MoE model (set model.moe.num_experts)")
    else:
        if moe % p.ep:
            raise ConfigError("parallel.ep", p.ep,
                              f"must divide model.moe.num_experts={moe} (allowed: {_divisors(moe)})")
        if m.ffn_hidden_size % etp:
            raise ConfigError("parallel.etp", etp,
                              f"must divide model.ffn_hidden_size={m.ffn_hidden_size}")
        dense_grid = world_size // p.pp  # ranks per pipeline stage: tp * cp * dp
        if dense_grid % (etp * p.ep):
            raise ConfigError("parallel.ep", p.ep,
                              f"expert grid etp*ep = {etp}*{p.ep} = {etp * p.ep} must divide the "
                              f"ranks of one pipeline stage, world_size/pp = {world_size}/{p.pp} "
                              f"= {dense_grid}")
        if p.tp > 1 and p.sequence_parallel is False:
            raise ConfigError("parallel.sequence_parallel", False,
                              "megatron-core MoE with parallel.tp > 1 requires sequence parallel "
                              "(set it to true or null)")
    if sequence_parallel_of(cfg) and m.seq_length % p.tp:
        raise ConfigError("model.seq_length", m.seq_length,
                          f"sequence parallel splits the sequence over parallel.tp={p.tp}: "
                          "must be a multiple of it")


def check_train(cfg: ExperimentConfig, world_size: int) -> None:
    t, p = cfg.train, cfg.parallel
    for name in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.warmup_iters", t.warmup_iters, minimum=0)
    if t.warmup_iters >= t.train_iters:
        raise ConfigError("train.warmup_iters", t.warmup_iters,
                          f"must be smaller than train.train_iters={t.train_iters}")
    if t.lr <= 0:
        raise ConfigError("train.lr", t.lr, "must be > 0")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError("train.min_lr_ratio", t.min_lr_ratio, "must be between 0 and 1")
    if t.clip_grad < 0:
        raise ConfigError("train.clip_grad", t.clip_grad, "must be >= 0 (0 disables clipping)")
    dp = world_size // (p.tp * p.pp * p.cp)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError("train.global_batch_size", t.global_batch_size,
                          f"must be a multiple of train.micro_batch_size*dp = "
                          f"{t.micro_batch_size}*{dp} = {per_step}")
    num_micro = t.global_batch_size // per_step
    if p.vp is not None and p.vp > 1 and num_micro % p.pp:
        raise ConfigError("train.global_batch_size", t.global_batch_size,
                          f"the interleaved pipeline needs the number of micro-batches "
                          f"({num_micro}) to be a multiple of parallel.pp={p.pp}")


def validate(cfg: ExperimentConfig, world_size: Optional[int] = None) -> int:
    """Check everything; return the world size the checks assumed."""
    check_choices(cfg)
    check_model(cfg)
    world = resolve_world_size(cfg.parallel) if world_size is None else world_size
    check_parallel(cfg, world)
    check_train(cfg, world)
    if cfg.smoke.steps < 1:
        raise ConfigError("smoke.steps", cfg.smoke.steps, "must be an integer >= 1")
    for i, name in enumerate(cfg.smoke.models):
        if name not in ("dense", "moe"):
            raise ConfigError(f"smoke.models[{i}]", name, "must be one of dense, moe")
    return world
