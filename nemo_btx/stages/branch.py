"""Stage `branch`: copy the seed into one expert directory per domain.

Each expert gets its own copy of the seed's weights at <run.dir>/experts/<domain>/init, so
expert jobs share nothing at run time (on a cluster they may run on different nodes, days
apart). Files are hard-linked where the file system allows (checkpoint files are never
modified in place), copied otherwise; the copy is renamed into place when complete.
"""

from __future__ import annotations

import logging
import os
import shutil

from nemo_btx.config.schema import ExperimentConfig, expert_domains
from nemo_btx.errors import BtxError
from nemo_btx.run_dir import RunDir

log = logging.getLogger(__name__)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.training import checkpoint as ckpt

    rd = RunDir.of(cfg)
    if not rd.complete(rd.seed):
        raise BtxError(f"{rd.seed}: the seed is not complete; run `nemo-btx seed` first")
    weights = rd.model("seed", []).checkpoints[0]
    ckpt.read_marker(rd.root / weights)  # refuses an incomplete copy
    for domain in expert_domains(cfg):
        target = rd.expert_init(domain)
        if ckpt.is_complete(target):
            log.info("branch: %s exists, skipping", target)
            continue
        tmp = target.parent / f".{target.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(rd.root / weights, tmp, copy_function=_link_or_copy)
        if target.exists():  # an unmarked leftover
            shutil.rmtree(target)
        os.replace(tmp, target)
        log.info("branch: seed -> %s", target)
