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

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import BtxError
from nemo_btx.stages.common import domain_names, expert_dir, run_dir

log = logging.getLogger(__name__)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.training import checkpoint as ckpt

    seed = run_dir(cfg) / "seed"
    if not (seed / "manifest.json").is_file():
        raise BtxError(f"{seed}: the seed is not complete; run `nemo-btx seed` first")
    ckpt.read_marker(seed / "weights")  # refuses an incomplete copy
    for domain in domain_names(cfg):
        target = expert_dir(cfg, domain) / "init"
        if ckpt.is_complete(target):
            log.info("branch: %s exists, skipping", target)
            continue
        tmp = target.parent / ".init.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(seed / "weights", tmp, copy_function=_link_or_copy)
        if target.exists():  # an unmarked leftover
            shutil.rmtree(target)
        os.replace(tmp, target)
        log.info("branch: seed -> %s", target)
