"""Stage `train-expert domain=NAME` (or `domain_index=I`): continue one expert on its domain.

The expert starts from its branched copy of the seed and trains on its own domain only; it is
evaluated on every domain, so its manifest shows both specialisation and forgetting.
"""

from __future__ import annotations

import logging

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import BtxError
from nemo_btx.stages.common import (
    domain_names, expert_dir, expert_table, require_data, resolve_domain, run_dir, train_on)

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.data.tokenizer import check_vocab, load_tokenizer
    from nemo_btx.training import checkpoint as ckpt
    from nemo_btx.training.loop import TrainJob, is_done, stage_config

    domain = resolve_domain(cfg)
    out = expert_dir(cfg, domain)
    if is_done(out):
        log.info("expert %s: complete, skipping", domain)
        return
    require_data(cfg)
    init = out / "init"
    if not ckpt.is_complete(init):
        raise BtxError(f"{init}: no branched seed for '{domain}'; run `nemo-btx branch` first")
    check_vocab(load_tokenizer(run_dir(cfg)), cfg.model)
    scfg = stage_config(cfg, cfg.expert, cfg.expert.train_iters)
    job = TrainJob(name=f"expert:{domain}", out_dir=out, domains=[domain], init_from=init,
                   eval_domains=domain_names(cfg), stage=cfg.expert,
                   parent=str(run_dir(cfg) / "seed"), ledger=run_dir(cfg) / "ledger.jsonl")
    rt = train_on(scfg, job)
    if rt.is_main:
        log.info("validation perplexity (seed and experts so far):\n%s", expert_table(cfg))
