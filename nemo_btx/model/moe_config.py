"""The MoE settings a training stage uses: shapes from the checkpoint, routing from the config.

Shared by the finetune stage and the compute-matched baselines, which both train a mixed or
upcycled MoE checkpoint with the paper's routing variants.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nemo_btx.config.schema import ExperimentConfig, ModelConfig, MoEConfig
from nemo_btx.errors import BtxError, ConfigError


def model_from_marker(marker: dict, path: Path) -> ModelConfig:
    """The ModelConfig a checkpoint was written with (its marker's "model" entry)."""
    saved = dict(marker.get("model") or {})
    if not saved:
        raise BtxError(f"{path}: the checkpoint records no model config; cannot finetune it")
    moe = MoEConfig(**saved.pop("moe"))
    model = ModelConfig(**saved, moe=moe)
    if moe.num_experts is None:
        raise BtxError(f"{path}: a dense checkpoint; finetune needs an MoE (run `nemo-btx mix` "
                       "or `nemo-btx upcycle` first)")
    return model


def routed_model(model: ModelConfig, cfg: ExperimentConfig) -> ModelConfig:
    """Apply the finetune routing variant to the checkpoint's MoE settings."""
    f, moe = cfg.finetune, model.moe
    n = moe.num_experts
    topk, capacity, pre_softmax = cfg.model.moe.router_topk, None, moe.router_pre_softmax
    if f.routing == "switch":
        # Switch: softmax over all experts, keep the top one with its probability as the gate
        # (softmax over a single chosen logit would always give 1 and no router gradient).
        if not 0 < f.switch_capacity_factor < float("inf"):  # reported as the key the user set
            raise ConfigError("finetune.switch_capacity_factor", f.switch_capacity_factor,
                              "must be a finite number > 0")
        topk, capacity, pre_softmax = 1, f.switch_capacity_factor, True
    elif f.routing == "soft":
        topk = n
    elif f.routing == "sample_top1":
        raise ConfigError("finetune.routing", f.routing,
                          "not available: megatron-core 0.16's TopKRouter has no sampling hook "
                          "(choose topk, switch or soft)")
    if not 1 <= topk <= n:
        raise ConfigError("model.moe.router_topk", topk, f"must be between 1 and the checkpoint's "
                          f"{n} experts")
    moe = dataclasses.replace(
        moe, router_topk=topk, capacity_factor=capacity, router_pre_softmax=pre_softmax,
        load_balancing_type=cfg.model.moe.load_balancing_type if f.load_balancing else "none",
        aux_loss_coeff=cfg.model.moe.aux_loss_coeff if f.load_balancing else 0.0,
        token_dispatcher_type=cfg.model.moe.token_dispatcher_type)
    return dataclasses.replace(model, moe=moe)
