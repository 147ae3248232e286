"""What a mix will do, decided from the config alone: sources, expert layout, MoE config, paths.

Everything here is checked before a process group, a model or a file exists, so a wrong
setting costs milliseconds on a login node instead of a failed Slurm job. `mix` and `upcycle`
produce the same kind of `MixPlan`; they differ only in their sources and expert layout.

The MoE's config is derived, not configured: the number of experts follows from the sources
(and `mix.split_experts`), so `model.moe.num_experts` may be left null for the whole experiment;
if it is set it must agree. The derived settings are written into the output's manifest and
checkpoint marker, which is what the finetune stage builds its model from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List

from nemo_btx.config.schema import ExperimentConfig, ModelConfig
from nemo_btx.errors import ConfigError
from nemo_btx.mixing import experts as layouts
from nemo_btx.mixing.sources import MixSource

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class MixPlan:
    kind: str
    """`mix` or `upcycle` (recorded in the manifest and the checkpoint marker)."""
    sources: List[MixSource]
    layout: layouts.ExpertLayout
    weights: List[float]
    """Per-source weights of the averaged (non-FFN) parameters, normalised to sum to 1."""
    router_init: str
    router_seed: int
    out: Path
    dense_model: ModelConfig
    """The sources' model (moe.num_experts = null)."""
    moe_model: ModelConfig
    """The output's model: what the next stage builds."""

    @property
    def num_experts(self) -> int:
        return len(self.layout)

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
            "experts": [[{"source": self.sources[seg.source].name, "start": seg.start,
                          "length": seg.length} for seg in expert] for expert in self.layout],
        }


def _resolve(path) -> Path:
    return Path(path).expanduser().resolve()


def _check_distinct(sources: List[MixSource], key: str) -> None:
    seen = {}
    for src in sources:
        real = _resolve(src.path)
        if real in seen:
            raise ConfigError(key, str(src.path),
                              f"the same checkpoint is used twice ({seen[real]} and {src.name}); "
                              "every expert must be a different checkpoint")
        seen[real] = src.name


def _weights(cfg: ExperimentConfig, n: int) -> List[float]:
    given = cfg.mix.average_weights
    if given is None:
        return [1.0 / n] * n
    if len(given) != n:
        raise ConfigError("mix.average_weights", list(given),
                          f"needs one weight per source ({n}: the experts, then the seed if "
                          "mix.include_seed)")
    if any(not math.isfinite(w) or w < 0 for w in given) or sum(given) <= 0:
        raise ConfigError("mix.average_weights", list(given),
                          "weights must be finite, >= 0, and not all zero")
    total = float(sum(given))
    return [float(w) / total for w in given]


def _models(cfg: ExperimentConfig, num_experts: int, topk: int, ffn: int):
    moe = cfg.model.moe
    dense = dataclasses.replace(cfg.model, moe=dataclasses.replace(moe, num_experts=None))
    moe_model = dataclasses.replace(cfg.model, ffn_hidden_size=ffn, moe=dataclasses.replace(
        moe, num_experts=num_experts, router_topk=topk))
    return dense, moe_model


def _out(cfg: ExperimentConfig, default: Path) -> Path:
    return _resolve(cfg.mix.out) if cfg.mix.out is not None else _resolve(default)


def seed_source(cfg: ExperimentConfig) -> MixSource:
    run = Path(cfg.run.dir)
    path = cfg.mix.seed_checkpoint or run / "seed" / "weights"
    return MixSource(name="seed", path=_resolve(path), role="seed",
                     domains=[d.name for d in cfg.data.domains])


def expert_sources(cfg: ExperimentConfig) -> List[MixSource]:
    """mix.experts, or <run.dir>/experts/<domain>/weights for every configured domain."""
    domains = [d.name for d in cfg.data.domains]
    run = Path(cfg.run.dir)
    if cfg.mix.experts is None:
        return [MixSource(name=d, path=_resolve(run / "experts" / d / "weights"), role="expert",
                          domains=[d]) for d in domains]
    paths = list(cfg.mix.experts)
    if len(paths) == len(domains):  # positional: expert i was trained on data.domains[i]
        return [MixSource(name=d, path=_resolve(p), role="expert", domains=[d])
                for d, p in zip(domains, paths)]
    return [MixSource(name=f"expert{i}", path=_resolve(p), role="expert")
            for i, p in enumerate(paths)]


def _check_router_init(cfg: ExperimentConfig, sources: List[MixSource], kind: str) -> None:
    if cfg.mix.router_init != "data":
        return
    if kind == "upcycle":
        raise ConfigError("mix.router_init", "data", "upcycling copies one FFN into every expert, "
                          "so no expert has a domain of its own; use random or zeros")
    if cfg.mix.blended:
        raise ConfigError("mix.router_init", "data", "blended experts mix every domain, so no "
                          "expert has a domain of its own; use random or zeros")
    if cfg.mix.router_init_batches < 1:
        raise ConfigError("mix.router_init_batches", cfg.mix.router_init_batches, "must be >= 1")
    for src in sources:
        if not src.domains:
            raise ConfigError("mix.router_init", "data",
                              f"the domain of {src.path} is unknown: give mix.experts in "
                              "data.domains order (one per domain) or use random/zeros")


def plan_mix(cfg: ExperimentConfig) -> MixPlan:
    """BTX: the experts (and the seed as the generalist) become one MoE."""
    mix = cfg.mix
    sources = expert_sources(cfg)
    if mix.include_seed:
        sources.append(seed_source(cfg))
    if not sources:
        raise ConfigError("mix.experts", mix.experts, "no sources: give experts or include the seed")
    _check_distinct(sources, "mix.experts" if mix.experts is not None else "mix.seed_checkpoint")
    n, ffn = len(sources), cfg.model.ffn_hidden_size
    if mix.split_experts != 1 and mix.blended:
        raise ConfigError("mix.blended", True, "split experts and blended experts are separate "
                          "ablations; set mix.split_experts=1 or mix.blended=false")
    if mix.blended:
        layout = layouts.blended(n, ffn)
    elif mix.split_experts != 1:
        layout = layouts.split(n, ffn, mix.split_experts)
    else:
        layout = layouts.standard(n, ffn)
    num_experts = len(layout)
    want = cfg.model.moe.num_experts
    if want is not None and want != num_experts:
        raise ConfigError("model.moe.num_experts", want,
                          f"mix builds {num_experts} experts from {n} sources"
                          f"{f' x {mix.split_experts} chunks' if mix.split_experts > 1 else ''}; "
                          f"leave it null or set it to {num_experts}")
    topk = cfg.model.moe.router_topk * mix.split_experts
    if not 1 <= topk <= num_experts:
        raise ConfigError("model.moe.router_topk", cfg.model.moe.router_topk,
                          f"top-k x split_experts = {topk} must be between 1 and the "
                          f"{num_experts} experts")
    _check_router_init(cfg, sources, "mix")
    dense, moe_model = _models(cfg, num_experts, topk, layouts.expert_ffn_size(layout))
    return MixPlan(kind="mix", sources=sources, layout=layout, weights=_weights(cfg, n),
                   router_init=mix.router_init, router_seed=cfg.train.seed,
                   out=_out(cfg, Path(cfg.run.dir) / "btx" / "mixed"),
                   dense_model=dense, moe_model=moe_model)


def plan_upcycle(cfg: ExperimentConfig) -> MixPlan:
    """Sparse upcycling: the seed's FFN in every expert (model.moe.num_experts, else domains + 1)."""
    mix = cfg.mix
    if mix.split_experts != 1 or mix.blended:
        log.warning("upcycle: mix.split_experts and mix.blended are ignored (every expert is "
                    "the seed's whole FFN)")
    if mix.average_weights is not None and list(mix.average_weights) != [1.0]:
        log.warning("upcycle: mix.average_weights is ignored (one source)")
    num_experts = cfg.model.moe.num_experts or len(cfg.data.domains) + 1
    ffn = cfg.model.ffn_hidden_size
    layout = layouts.upcycle(num_experts, ffn)
    topk = cfg.model.moe.router_topk
    if not 1 <= topk <= num_experts:
        raise ConfigError("model.moe.router_topk", topk,
                          f"must be between 1 and the {num_experts} experts")
    sources = [seed_source(cfg)]
    _check_router_init(cfg, sources, "upcycle")
    dense, moe_model = _models(cfg, num_experts, topk, ffn)
    return MixPlan(kind="upcycle", sources=sources, layout=layout, weights=[1.0],
                   router_init=mix.router_init, router_seed=cfg.train.seed,
                   out=_out(cfg, Path(cfg.run.dir) / "baselines" / "upcycle" / "mixed"),
                   dense_model=dense, moe_model=moe_model)


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
    for src in plan.sources:
        real = _resolve(src.path)
        if real == plan.out or plan.out in real.parents:
            raise ConfigError("mix.out", str(plan.out), f"would overwrite the source {src.path}")
