"""Stage `baselines`: sparse upcycling (data- and compute-matched) and the dense baseline.

All three run the same training loop as BTX on the same weighted mixture of all domains:

    <run.dir>/baselines/upcycle/data_matched     upcycled seed, as many MoE steps as BTX's finetune
    <run.dir>/baselines/upcycle/compute_matched  upcycled seed, BTX's expert + finetune FLOPs
    <run.dir>/baselines/dense                    the seed continued, with that same FLOP budget

The upcycled checkpoint comes from `nemo-btx upcycle`; budgets come from the compute ledger
(nemo_btx/training/budget.py), so the report's compute table and these runs agree by design.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.stages.common import domain_names, domain_weights, require_data, run_dir, train_on

log = logging.getLogger(__name__)

KINDS = ("upcycle_data", "upcycle_compute", "dense_compute")


def plan(cfg: ExperimentConfig):
    """[(kind, out_dir, init_checkpoint, model config, steps)] without touching any process group."""
    from nemo_btx.model.moe_config import model_from_marker, routed_model
    from nemo_btx.training import checkpoint as ckpt
    from nemo_btx.training.budget import btx_flops, steps_for_flops

    rd = run_dir(cfg)
    for i, kind in enumerate(cfg.baselines.which):
        if kind not in KINDS:
            raise ConfigError(f"baselines.which[{i}]", kind, f"must be one of {', '.join(KINDS)}")
    finetuned = rd / "btx" / "finetuned" / "manifest.json"
    if not finetuned.is_file():
        raise BtxError(f"{finetuned}: BTX is not finetuned yet; the baselines are matched to it")
    btx_steps = json.loads(finetuned.read_text())["steps"]
    budget = btx_flops(rd)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    upcycled = Path(cfg.baselines.upcycle) if cfg.baselines.upcycle else rd / "baselines" / "upcycle" / "mixed"
    out = []
    for kind in cfg.baselines.which:
        if kind.startswith("upcycle"):
            moe = routed_model(model_from_marker(ckpt.read_marker(upcycled), upcycled), cfg)
            steps = btx_steps if kind == "upcycle_data" else steps_for_flops(budget, moe, tokens_per_step)
            name = "data_matched" if kind == "upcycle_data" else "compute_matched"
            out.append((kind, rd / "baselines" / "upcycle" / name, upcycled, moe, steps))
        else:
            seed = rd / "seed" / "weights"
            dense = model_from_seed(ckpt.read_marker(seed), cfg)
            out.append((kind, rd / "baselines" / "dense", seed, dense,
                        steps_for_flops(budget, dense, tokens_per_step)))
    return out


def model_from_seed(marker: dict, cfg: ExperimentConfig):
    from nemo_btx.config.schema import ModelConfig, MoEConfig

    saved = dict(marker["model"])
    return ModelConfig(**{**saved, "moe": MoEConfig(**saved["moe"])})


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.config.validate import validate
    from nemo_btx.training.loop import TrainJob, is_done, stage_config

    require_data(cfg)
    names = domain_names(cfg)
    for kind, out, init, model, steps in plan(cfg):
        if is_done(out):
            log.info("baselines: %s complete, skipping", out)
            continue
        log.info("baselines: %s, %d steps from %s", kind, steps, init)
        scfg = stage_config(dataclasses.replace(cfg, model=model), cfg.baselines, steps)
        validate(scfg)
        job = TrainJob(name=f"baseline:{kind}", out_dir=out, domains=names,
                       weights=domain_weights(cfg, names), init_from=init, eval_domains=names,
                       stage=cfg.baselines, parent=str(init), ledger=run_dir(cfg) / "ledger.jsonl")
        train_on(scfg, job)
