"""Stage `seed`: pre-train the seed on the general mixture of all domains, or adopt a checkpoint.

Output: <run.dir>/seed/{weights,checkpoints,metrics.jsonl,manifest.json}.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_btx.config.budgets import stage_iters
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.run_dir import MANIFEST, WEIGHTS, RunDir
from nemo_btx.stages.common import domain_names, domain_weights, require_data, train_on

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.data.tokenizer import check_vocab, load_tokenizer
    from nemo_btx.training.loop import TrainJob, stage_config

    rd = RunDir.of(cfg)
    out = rd.seed
    if rd.complete(out):
        log.info("seed: complete (%s), skipping", out / MANIFEST)
        return
    require_data(cfg)
    check_vocab(load_tokenizer(rd.root), cfg.model)
    if cfg.seed.checkpoint is not None:
        from nemo_btx.model.agreement import check_seed

        check_seed(cfg)
        return adopt(cfg, Path(cfg.seed.checkpoint), out)
    scfg = stage_config(cfg, cfg.seed, stage_iters(cfg, "seed"))
    names = domain_names(cfg)
    job = TrainJob(name="seed", out_dir=out, domains=names, weights=domain_weights(cfg, names),
                   eval_domains=names, stage=cfg.seed, ledger=rd.ledger)
    train_on(scfg, job)


def adopt(cfg: ExperimentConfig, source: Path, out: Path) -> None:
    """Use an existing checkpoint as the seed: load it at this config (so a mismatch fails
    here, not in a later stage) and write it as the seed's weights."""
    from nemo_btx.artifacts import software_versions, write_json_atomic
    from nemo_btx.config import to_yaml
    from nemo_btx.model.build import build_model
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training import checkpoint as ckpt

    rt = init_runtime(cfg)
    try:
        chunks = build_model(cfg, wrap_ddp=False)
        ckpt.load_model_weights(chunks, source, cfg.model)
        ckpt.save_model_weights(chunks, out / WEIGHTS, cfg.model, extra={"stage": "seed"})
        if rt.is_main:
            write_json_atomic(out / MANIFEST, {
                "stage": "seed", "adopted_from": str(source.resolve()), "steps": 0,
                "tokens_seen": 0, "weights": WEIGHTS, "config": to_yaml(cfg),
                "versions": software_versions(), "complete": True})
        log.info("seed: adopted %s", source)
    finally:
        shutdown()
