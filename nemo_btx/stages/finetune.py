"""Stage `finetune`: train the mixed MoE on the weighted mixture of all domains.

The checkpoint decides the architecture (its marker carries the model config the mix stage
wrote: experts, widths, vocabulary); `finetune.*` decides how tokens are routed, so the paper's
routing ablations are one override each:

    nemo-btx finetune                                   # top-2, load balancing (the paper)
    nemo-btx finetune finetune.routing=switch           # top-1, capacity factor 1.5
    nemo-btx finetune finetune.routing=soft             # every expert active
    nemo-btx finetune finetune.load_balancing=false     # no aux loss (routing may collapse)
    nemo-btx finetune finetune.freeze_experts=true      # only attention/norms/embeddings/routers
    nemo-btx finetune finetune.init=runs/tiny/baselines/upcycle/mixed finetune.out=...

Output: <run.dir>/btx/finetuned (weights, checkpoints, metrics, routing.json, manifest.json).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from nemo_btx.config.schema import ExperimentConfig, ModelConfig, MoEConfig
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.stages.common import domain_names, domain_weights, require_data, run_dir

log = logging.getLogger(__name__)


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


def is_expert_param(name: str) -> bool:
    return ".mlp.experts." in name


def _paths(cfg: ExperimentConfig):
    f = cfg.finetune
    init = Path(f.init) if f.init else run_dir(cfg) / "btx" / "mixed"
    out = Path(f.out) if f.out else run_dir(cfg) / "btx" / "finetuned"
    return init, out


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with `model` taken from the input checkpoint and routed per `finetune.*`.

    Idempotent, and what the CLI validates before the stage starts.
    """
    from nemo_btx.training import checkpoint as ckpt

    init, _ = _paths(cfg)
    model = routed_model(model_from_marker(ckpt.read_marker(init), init), cfg)
    return dataclasses.replace(cfg, model=model)


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.config.validate import validate
    from nemo_btx.data.loader import TrainData, validation_batches
    from nemo_btx.data.tokenizer import check_vocab, load_tokenizer
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training.loop import TrainJob, is_done, run_training, stage_config

    f = cfg.finetune
    init, out = _paths(cfg)
    if is_done(out):
        log.info("finetune: %s complete, skipping", out)
        return
    require_data(cfg)
    scfg = stage_config(resolve(cfg), f, f.train_iters)
    validate(scfg)
    check_vocab(load_tokenizer(run_dir(cfg)), scfg.model)
    rt = init_runtime(scfg)
    try:
        names = domain_names(cfg)
        data = TrainData(scfg, run_dir(cfg), names, domain_weights(cfg, names))
        valid = {d: validation_batches(scfg, run_dir(cfg), d, cfg.data.eval_iters) for d in names}
        job = TrainJob(name="finetune", out_dir=out, domains=names, weights=domain_weights(cfg, names),
                       init_from=init, eval_domains=names, stage=f, parent=str(init),
                       frozen=is_expert_param if f.freeze_experts else None,
                       ledger=run_dir(cfg) / "ledger.jsonl")
        run_training(scfg, job, rt, data.global_batch, valid)
    finally:
        shutdown()
