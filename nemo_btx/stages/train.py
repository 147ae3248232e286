"""`nemo-btx train`: one plain training run (train.train_iters steps) on chosen domains."""

from __future__ import annotations

from pathlib import Path

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.run_dir import RunDir
from nemo_btx.stages.common import domain_names, domain_weights, require_data, train_on


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.data.tokenizer import check_vocab, load_tokenizer
    from nemo_btx.training.loop import TrainJob, stage_config

    rd = RunDir.of(cfg)
    out = Path(cfg.job.out) if cfg.job.out else rd.train
    if rd.complete(out):
        return
    require_data(cfg)
    check_vocab(load_tokenizer(rd.root), cfg.model)
    names = cfg.job.domains or domain_names(cfg)
    unknown = sorted(set(names) - set(domain_names(cfg)))
    if unknown:
        from nemo_btx.errors import ConfigError
        raise ConfigError("job.domains", names, f"unknown domains {unknown}; configured: "
                          f"{', '.join(domain_names(cfg))}")
    scfg = stage_config(cfg, cfg.job, cfg.train.train_iters)
    job = TrainJob(name="train", out_dir=out, domains=names, weights=domain_weights(cfg, names),
                   init_from=Path(cfg.job.init) if cfg.job.init else None,
                   eval_domains=domain_names(cfg), stage=cfg.job,
                   ledger=rd.ledger)
    train_on(scfg, job)
