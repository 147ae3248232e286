"""Which megatron-core router settings MixtralForCausalLM (and Qwen3MoeForCausalLM) computes exactly.

Mixtral's router (and Qwen3-MoE's with norm_topk_prob, which export-hf writes): softmax over
all expert logits, keep the top k, renormalise the k weights
to sum 1. megatron-core's default TopKRouter (score function softmax, `moe_router_pre_softmax`
off): take the top-k logits, softmax over those k. Both give softmax(l_i) / sum_{j in top-k}
softmax(l_j) = exp(l_i) / sum_{j in top-k} exp(l_j) for the same k experts (the top k of the
logits and of their softmax are the same), so that setting exports exactly. Anything that
changes which experts are chosen or what weight they get is refused, naming the setting:

    setting (model.* / megatron-core)            exports exactly when
    moe.router_pre_softmax                       false, or router_topk == num_experts
                                                 (softmax over all without renormalising
                                                 differs from Mixtral unless all are kept)
    moe.capacity_factor                          null (no token dropping or padding)
    moe.load_balancing_type                      aux_loss, seq_aux_loss or none (training-
                                                 only losses); sinkhorn routes differently
    moe_router_score_function                    softmax (not sigmoid)
    moe_router_topk_scaling_factor               unset or 1
    moe_router_enable_expert_bias                off (and no router.expert_bias tensor)
    moe_router_num_groups / group_topk           unset (no group-limited routing)
    shared experts                               none
    aux_loss_coeff, z-loss, input jitter,        anything: they only act while training,
    token dispatcher, grouped GEMM, EP/TP        or do not change the result

Our ModelConfig has only the first three; the megatron-core names are checked too when a
checkpoint marker carries them, so a checkpoint written with them cannot slip through.
"""

from __future__ import annotations

from typing import Iterable

from nemo_btx.hf.config import UnsupportedModelError

#: (setting, value, why Mixtral differs) for the refusals; also the README's table.
EXACT = [
    ("model.moe.router_pre_softmax", "false (or router_topk = num_experts)",
     "softmax over all experts without renormalising the top-k weights"),
    ("model.moe.capacity_factor", "null", "token dropping at the expert capacity"),
    ("model.moe.load_balancing_type", "aux_loss | seq_aux_loss | none", "Sinkhorn routing"),
    ("moe_router_score_function", "softmax", "sigmoid scores"),
    ("moe_router_topk_scaling_factor", "unset or 1", "scaled routing weights"),
    ("moe_router_enable_expert_bias", "false", "an expert bias added to the scores"),
    ("moe_router_num_groups", "unset", "group-limited routing"),
]


def _get(moe: dict, *names):
    for name in names:
        if moe.get(name) is not None:
            return name, moe[name]
    return names[0], None


def _refuse(where: str, key: str, value, what: str) -> None:
    raise UnsupportedModelError(
        f"{where}: {key}={value!r}: {what} is not what MixtralForCausalLM or Qwen3MoeForCausalLM "
        "computes; export-hf writes only routers they reproduce exactly (see nemo_btx/hf/routing.py)")


def check_routing(moe: dict, keys: Iterable[str], where: str) -> None:
    """Raise UnsupportedModelError naming the first setting Mixtral would not reproduce.

    `moe` is the checkpoint marker's model.moe entry (our names, or megatron-core's `moe_*`
    names), `keys` the checkpoint's tensor keys."""
    n, k = moe.get("num_experts"), moe.get("router_topk", 2)
    if moe.get("router_pre_softmax") and k != n:
        _refuse(where, "model.moe.router_pre_softmax", True, f"softmax over all {n} experts "
                f"without renormalising the top-{k} weights")
    name, cap = _get(moe, "capacity_factor", "moe_expert_capacity_factor")
    if cap is not None:
        _refuse(where, f"model.moe.{name}" if name == "capacity_factor" else name, cap,
                "token dropping at the expert capacity")
    if moe.get("moe_pad_expert_input_to_capacity"):
        _refuse(where, "moe_pad_expert_input_to_capacity", True, "padding experts to capacity")
    name, lb = _get(moe, "load_balancing_type", "moe_router_load_balancing_type")
    if lb == "sinkhorn":
        _refuse(where, f"model.moe.{name}" if name == "load_balancing_type" else name, lb,
                "Sinkhorn routing")
    name, score = _get(moe, "router_score_function", "moe_router_score_function", "score_function")
    if score not in (None, "softmax"):
        _refuse(where, name, score, f"{score} routing scores")
    name, scale = _get(moe, "router_topk_scaling_factor", "moe_router_topk_scaling_factor")
    if scale not in (None, 1, 1.0):
        _refuse(where, name, scale, "routing weights scaled by a factor")
    name, bias = _get(moe, "router_enable_expert_bias", "moe_router_enable_expert_bias")
    if bias:
        _refuse(where, name, bias, "an expert bias added to the routing scores")
    for name in ("router_num_groups", "moe_router_num_groups", "router_group_topk",
                 "moe_router_group_topk"):
        if moe.get(name):
            _refuse(where, name, moe[name], "group-limited routing")
    for name in ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"):
        if moe.get(name):
            _refuse(where, name, moe[name], "a shared expert")
    for key in keys:
        if key.startswith("decoder.layers.mlp.router.") and key != "decoder.layers.mlp.router.weight":
            what = "an expert bias added to the routing scores" if "expert_bias" in key else "a router tensor besides its weight"
            _refuse(where, f"tensor {key}", "present", what)
        if key.startswith("decoder.layers.mlp.shared_experts."):
            _refuse(where, f"tensor {key}", "present", "a shared expert")
