"""Stage `train-expert domain=NAME` (or `domain_index=I`): continue one expert on its domain.

The expert starts from its branched copy of the seed and trains on its own domain only; it is
evaluated on every domain, so its manifest shows both specialisation and forgetting.
"""

from __future__ import annotations

import logging

from nemo_btx.config.budgets import stage_iters
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import BtxError
from nemo_btx.run_dir import RunDir
from nemo_btx.stages.common import domain_names, expert_table, require_data, resolve_domain, train_on

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.data.tokenizer import check_vocab, load_tokenizer
    from nemo_btx.training import checkpoint as ckpt
    from nemo_btx.training.loop import TrainJob, stage_config

    domain = resolve_domain(cfg)
    rd = RunDir.of(cfg)
    out = rd.expert(domain)
    if rd.complete(out):
        log.info("expert %s: complete, skipping", domain)
        return
    require_data(cfg)
    init = rd.expert_init(domain)
    if not ckpt.is_complete(init):
        raise BtxError(f"{init}: no branched seed for '{domain}'; run `nemo-btx branch` first")
    check_vocab(load_tokenizer(rd.root), cfg.model)
    scfg = stage_config(cfg, cfg.expert, stage_iters(cfg, "experts", domain))
    job = TrainJob(name=f"expert:{domain}", out_dir=out, domains=[domain], init_from=init,
                   eval_domains=domain_names(cfg), stage=cfg.expert,
                   parent=str(rd.seed), ledger=rd.ledger)
    rt = train_on(scfg, job)
    if rt.is_main:
        log.info("validation perplexity (seed and experts so far):\n%s", expert_table(cfg))
