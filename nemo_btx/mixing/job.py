"""One mix job end to end: skip if done, check everything, start the runtime, convert.

Order is deliberate: the config and every input are checked (markers, model shapes, indexes,
shard files, the output path) before the process group or any file exists, so a mistake is one
clear error with the path and nothing is written. Every rank runs the same checks on the same
files, so they fail or pass together without talking to each other.
"""

from __future__ import annotations

import logging
from typing import Optional

from nemo_btx.artifacts import read_json
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import ConfigError
from nemo_btx.mixing.plan import MANIFEST, MixPlan, check_output_free, inspect_sources, is_complete
from nemo_btx.mixing.router import BatchesFor

log = logging.getLogger(__name__)


def prepare(cfg: ExperimentConfig, plan: MixPlan) -> Optional[ExperimentConfig]:
    """Checks without side effects; the MoE experiment config, or None if the output is complete."""
    from nemo_btx.config.validate import validate

    if is_complete(plan.out):
        stage = read_json(plan.out / MANIFEST).get("stage")
        if stage != plan.kind:
            raise ConfigError("mix.out", str(plan.out), f"holds a complete '{stage}' output, not "
                              f"'{plan.kind}'; choose another mix.out")
        log.info("%s: %s is complete, skipping", plan.kind, plan.out)
        return None
    check_output_free(plan.out)
    inspect_sources(plan)
    moe_cfg = plan.moe_config(cfg)
    validate(moe_cfg)
    return moe_cfg


def run_plan(cfg: ExperimentConfig, plan: MixPlan, batches_for: Optional[BatchesFor] = None) -> Optional[dict]:
    """Check, initialise the runtime at cfg.parallel (the target layout), convert, shut down."""
    from nemo_btx.mixing.convert import mix_checkpoint
    from nemo_btx.runtime.distributed import init_runtime, shutdown

    moe_cfg = prepare(cfg, plan)
    if moe_cfg is None:
        return None
    log.info("%s: %d sources -> %d experts (top-%d, FFN %d) at %s", plan.kind, len(plan.sources),
             plan.num_experts, plan.moe_model.moe.router_topk, plan.moe_model.ffn_hidden_size,
             plan.out)
    init_runtime(moe_cfg)
    try:
        return mix_checkpoint(moe_cfg, plan, batches_for=batches_for)
    finally:
        shutdown()
