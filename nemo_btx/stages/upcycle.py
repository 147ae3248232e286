"""Stage `upcycle`: the sparse-upcycling baseline, the seed's FFN copied into every expert.

The same converter as `mix` with one source: model.moe.num_experts experts (default: number
of domains + 1, the size of the BTX MoE it is compared with) and a new router.
Output: <run.dir>/baselines/upcycled (or mix.out).
"""

from __future__ import annotations

from nemo_btx.config.schema import ExperimentConfig


def resolve_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with the MoE model this stage writes, so the CLI validates the target layout
    (e.g. parallel.ep) against the real number of experts. Reads only the sources' markers."""
    from nemo_btx.errors import ConfigError
    from nemo_btx.mixing.plan import plan_upcycle

    if cfg.mix.format != "megatron":
        raise ConfigError("mix.format", cfg.mix.format, "upcycle writes a megatron-core MoE (the "
                          "baselines train it); export it afterwards with `nemo-btx export-hf`")
    return plan_upcycle(cfg).moe_config(cfg)


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.mixing.job import run_plan
    from nemo_btx.mixing.plan import plan_upcycle

    run_plan(cfg, plan_upcycle(cfg))
