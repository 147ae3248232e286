"""The megatron-core side of a mix: the recipe plus the MoE config, expert layout and sources.

The merge rules (sources, expert table, averaging weights, top-k, router, input checks) are
the recipe's (`recipe.py`), shared with the Hugging Face merge; a `MixPlan` adds what only the
megatron-core writer needs: the dense and MoE `ModelConfig`s and the expert table in FFN units
of the config's model. Everything here is checked before a process group, a model or a file
exists, so a wrong setting costs milliseconds on a login node instead of a failed Slurm job.
`mix` and `upcycle` produce the same kind of `MixPlan`; they differ only in their recipe.

The MoE's config is derived, not configured: the number of experts follows from the sources
(and `mix.split_experts`), so `model.moe.num_experts` may be left null for the whole experiment;
if it is set it must agree. The derived settings are written into the output's manifest and
checkpoint marker, which is what the finetune stage builds its model from.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List

from nemo_btx.config.schema import ExperimentConfig, ModelConfig
from nemo_btx.errors import ConfigError
from nemo_btx.mixing import recipe as recipes
from nemo_btx.mixing.experts import ExpertLayout
from nemo_btx.mixing.sources import MixSource
from nemo_btx.run_dir import MANIFEST

log = logging.getLogger(__name__)


@dataclass
class MixPlan:
    recipe: recipes.Recipe
    """The merge rules: sources, expert table, weights, top-k, router."""
    sources: List[MixSource]
    """The recipe's sources, in its order; `inspect_sources` adds their markers and indexes."""
    layout: ExpertLayout
    """The recipe's expert table in FFN units of the dense model."""
    dense_model: ModelConfig
    """The sources' model (moe.num_experts = null)."""
    moe_model: ModelConfig
    """The output's model: what the next stage builds."""

    @property
    def kind(self) -> str:
        return self.recipe.kind

    @property
    def out(self) -> Path:
        return self.recipe.out

    @property
    def num_experts(self) -> int:
        return self.recipe.num_experts

    @property
    def router_init(self) -> str:
        return self.recipe.router_init

    def moe_config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The experiment config with the MoE model: the config the converter runs under."""
        return dataclasses.replace(cfg, model=self.moe_model)

    def dense_config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The experiment config with the sources' dense model (router_init=data runs them)."""
        return dataclasses.replace(cfg, model=self.dense_model)

    def describe(self) -> dict:
        """The MoE settings for the manifest, including the overrides that rebuild the model."""
        m = self.moe_model
        return {
            "num_experts": m.moe.num_experts,
            "router_topk": m.moe.router_topk,
            "aux_loss_coeff": m.moe.aux_loss_coeff,
            "load_balancing_type": m.moe.load_balancing_type,
            "ffn_hidden_size": m.ffn_hidden_size,
            "overrides": [f"model.moe.num_experts={m.moe.num_experts}",
                          f"model.moe.router_topk={m.moe.router_topk}",
                          f"model.ffn_hidden_size={m.ffn_hidden_size}"],
            "experts": self.recipe.describe_experts(self.dense_model.ffn_hidden_size),
        }


def plan_for(cfg: ExperimentConfig, recipe: recipes.Recipe) -> MixPlan:
    """The recipe applied to the config's (dense) model."""
    dense = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, num_experts=None))
    return MixPlan(recipe=recipe, sources=[MixSource.of(s) for s in recipe.sources],
                   layout=recipe.layout(dense.ffn_hidden_size), dense_model=dense,
                   moe_model=recipe.moe_model(dense))


def plan_mix(cfg: ExperimentConfig) -> MixPlan:
    """BTX: the experts (and the seed as the generalist) become one MoE."""
    return plan_for(cfg, recipes.mix_recipe(cfg))


def plan_upcycle(cfg: ExperimentConfig) -> MixPlan:
    """Sparse upcycling: the seed's FFN in every expert (model.moe.num_experts, else domains + 1)."""
    return plan_for(cfg, recipes.upcycle_recipe(cfg))


def is_complete(out: Path) -> bool:
    """A mix output is complete when its manifest exists (written inside it before the rename)."""
    return (Path(out) / MANIFEST).is_file()


def check_output_free(out: Path) -> None:
    """The output must not exist (a complete one is skipped by the caller, before this)."""
    if out.exists() or out.is_symlink():
        raise ConfigError("mix.out", str(out),
                          f"already exists and is not a complete {MANIFEST}-bearing mix output; "
                          "remove it or choose another mix.out (nothing was written)")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError("mix.out", str(out), f"{out.parent} is a file, not a directory")


def inspect_sources(plan: MixPlan) -> None:
    """Markers, model shapes, indexes and shard files of every source (no tensor reads)."""
    from nemo_btx.mixing.sources import check_sources_agree, inspect_source

    for src in plan.sources:
        inspect_source(src, plan.dense_model)
    check_sources_agree(plan.sources, plan.dense_model.vocab_size)
    recipes.check_out(plan.out, plan.recipe.sources)
