"""Stage `finetune`: train the mixed MoE on the weighted mixture of all domains.

The checkpoint decides the architecture (its marker carries the model config the mix stage
wrote: experts, widths, vocabulary); `finetune.*` decides how tokens are routed, so the paper's
routing ablations are one override each:

    nemo-btx finetune                                   # top-2, load balancing (the paper)
    nemo-btx finetune finetune.routing=switch           # top-1, capacity factor 1.5
    nemo-btx finetune finetune.routing=soft             # every expert active
    nemo-btx finetune finetune.load_balancing=false     # no aux loss (routing may collapse)
    nemo-btx finetune finetune.freeze_experts=true      # only attention/norms/embeddings/routers
    nemo-btx finetune finetune.init=runs/tiny/baselines/upcycled finetune.out=...

Output: <run.dir>/btx/finetuned (weights, checkpoints, metrics, routing.json, manifest.json).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from nemo_btx.config.budgets import stage_iters
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.model.moe_config import model_from_marker, routed_model
from nemo_btx.run_dir import RunDir
from nemo_btx.stages.common import domain_names, domain_weights, require_data, train_on

log = logging.getLogger(__name__)


def is_expert_param(name: str) -> bool:
    return ".mlp.experts." in name


def _paths(cfg: ExperimentConfig):
    f = cfg.finetune
    rd = RunDir.of(cfg)
    init = Path(f.init) if f.init else rd.mixed
    out = Path(f.out) if f.out else rd.finetuned
    return init, out


def resolve_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with `model` taken from the input checkpoint and routed per `finetune.*`.

    Idempotent, and what the CLI validates before the stage starts.
    """
    from nemo_btx.training import checkpoint as ckpt

    init, _ = _paths(cfg)
    model = routed_model(model_from_marker(ckpt.read_marker(init), init), cfg)
    return dataclasses.replace(cfg, model=model)


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.config.validate import validate
    from nemo_btx.data.tokenizer import check_vocab, load_tokenizer
    from nemo_btx.training.loop import TrainJob, stage_config

    f = cfg.finetune
    init, out = _paths(cfg)
    if RunDir.complete(out):
        log.info("finetune: %s complete, skipping", out)
        return
    require_data(cfg)
    scfg = stage_config(resolve_config(cfg), f, stage_iters(cfg, "finetune"))
    validate(scfg)
    check_vocab(load_tokenizer(RunDir.of(cfg).root), scfg.model)
    names = domain_names(cfg)
    job = TrainJob(name="finetune", out_dir=out, domains=names, weights=domain_weights(cfg, names),
                   init_from=init, eval_domains=names, stage=f, parent=str(init),
                   frozen=is_expert_param if f.freeze_experts else None,
                   ledger=RunDir.of(cfg).ledger)
    train_on(scfg, job)
