"""Stage `upcycle`: the sparse-upcycling baseline, the seed's FFN copied into every expert.

The same converter as `mix` with one source: model.moe.num_experts experts (default: number
of domains + 1, the size of the BTX MoE it is compared with) and a new router.
Output: <run.dir>/baselines/upcycle/mixed (or mix.out).
"""

from __future__ import annotations

from nemo_btx.config.schema import ExperimentConfig


def run(cfg: ExperimentConfig) -> None:
    from nemo_btx.mixing.job import run_plan
    from nemo_btx.mixing.plan import plan_upcycle

    run_plan(cfg, plan_upcycle(cfg))
