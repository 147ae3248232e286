"""Stage `baselines`: sparse upcycling (data- and compute-matched) and the dense baseline.

All three run the same training loop as BTX on the same weighted mixture of all domains:

    <run.dir>/baselines/upcycle-data     upcycled seed, as many MoE steps as BTX's finetune
    <run.dir>/baselines/upcycle-compute  upcycled seed, BTX's expert + finetune FLOPs
    <run.dir>/baselines/dense            the seed continued, with that same FLOP budget

The upcycled checkpoint comes from `nemo-btx upcycle`; budgets come from the compute ledger
(nemo_btx/training/budget.py), so the report's compute table and these runs agree by design.
The baselines' names and directories are defined once, in nemo_btx/run_dir.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import BtxError
from nemo_btx.run_dir import MANIFEST, RunDir, baseline
from nemo_btx.stages.common import domain_names, domain_weights, require_data, train_on

log = logging.getLogger(__name__)


def plan(cfg: ExperimentConfig):
    """[(name, out_dir, init_checkpoint, model config, steps)] without touching any process group."""
    from nemo_btx.model.moe_config import model_from_marker, routed_model
    from nemo_btx.training import checkpoint as ckpt
    from nemo_btx.training.budget import btx_flops, steps_for_flops

    rd = RunDir.of(cfg)
    if not rd.complete(rd.finetuned):
        raise BtxError(f"{rd.finetuned / MANIFEST}: BTX is not finetuned yet; the baselines are matched to it")
    btx_steps = json.loads((rd.finetuned / MANIFEST).read_text())["steps"]
    budget = btx_flops(rd.root)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    upcycled = Path(cfg.baselines.upcycle) if cfg.baselines.upcycle else rd.upcycled
    out = []
    for name in cfg.baselines.which:
        b = baseline(name)
        if b.moe:
            init = upcycled
            model = routed_model(model_from_marker(ckpt.read_marker(init), init), cfg)
        else:
            init = rd.root / rd.model("seed", []).checkpoints[0]
            model = model_from_seed(ckpt.read_marker(init), cfg)
        steps = btx_steps if b.matched == "data" else steps_for_flops(budget, model, tokens_per_step)
        out.append((name, rd.baseline(name), init, model, steps))
    return out


def model_from_seed(marker: dict, cfg: ExperimentConfig):
    from nemo_btx.config.schema import ModelConfig, MoEConfig

    saved = dict(marker["model"])
    return ModelConfig(**{**saved, "moe": MoEConfig(**saved["moe"])})


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.config.validate import validate
    from nemo_btx.training.loop import TrainJob, stage_config

    require_data(cfg)
    names = domain_names(cfg)
    for name, out, init, model, steps in plan(cfg):
        if RunDir.complete(out):
            log.info("baselines: %s complete, skipping", out)
            continue
        log.info("baselines: %s, %d steps from %s", name, steps, init)
        scfg = stage_config(dataclasses.replace(cfg, model=model), cfg.baselines, steps)
        validate(scfg)
        job = TrainJob(name=f"baseline:{name}", out_dir=out, domains=names,
                       weights=domain_weights(cfg, names), init_from=init, eval_domains=names,
                       stage=cfg.baselines, parent=str(init), ledger=RunDir.of(cfg).ledger)
        train_on(scfg, job)
