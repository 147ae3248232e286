"""Stage `mix`: the domain experts (and the seed as the generalist) become one MoE checkpoint.

Run it as a job at the layout the MoE will train at (e.g. `torchrun --nproc_per_node 8 -m
nemo_btx.cli mix parallel.ep=4 parallel.tp=2`): each rank reads only the slices it writes.
Output: <run.dir>/btx/mixed (or mix.out), a megatron-core checkpoint with manifest.json.
With Hugging Face Llama experts or mix.format=mixtral: a Mixtral directory at mix.out
(`nemo_btx/hf/merge.py`, one process).
"""

from __future__ import annotations

import logging

from nemo_btx.config.schema import ExperimentConfig

log = logging.getLogger(__name__)


def _validation_batches(cfg: ExperimentConfig):
    """router_init=data: held-out batches of each source's domains (the seed: all of them)."""
    from pathlib import Path

    from nemo_btx.data.loader import validation_batches

    def batches_for(source):
        return [b for domain in source.domains
                for b in validation_batches(cfg, Path(cfg.run.dir), domain, cfg.mix.router_init_batches)]
    return batches_for


def resolve_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with the MoE model this stage writes, so the CLI validates the target layout
    (e.g. parallel.ep) against the real number of experts. Reads only the sources' markers."""
    from nemo_btx.hf.merge import wants_hf_merge

    if wants_hf_merge(cfg):  # Hugging Face experts -> Mixtral: no megatron model to validate
        return cfg
    from nemo_btx.mixing.plan import plan_mix  # imports torch: not for the Hugging Face merge

    return plan_mix(cfg).moe_config(cfg)


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.hf.merge import merge_from_config, wants_hf_merge

    if wants_hf_merge(cfg):  # mix.format=mixtral or Hugging Face experts (nemo_btx/hf/merge.py)
        merge_from_config(cfg)
        return
    from nemo_btx.mixing.job import run_plan
    from nemo_btx.mixing.plan import plan_mix

    plan = plan_mix(cfg)
    batches = _validation_batches(cfg) if plan.router_init == "data" else None
    run_plan(cfg, plan, batches)
