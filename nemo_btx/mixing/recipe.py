"""The merge recipe: what a mix makes of its sources, decided once for both writers (no torch).

Two writers turn dense models into one MoE: the megatron-core converter (`nemo-btx mix` and
`upcycle`: `plan.py`, `convert.py`) and the Hugging Face merge (Llama experts -> Mixtral,
`nemo_btx/hf/merge.py`, which must not import torch). Both build a `Recipe` here and only
translate it into their tensor names and I/O, so the rules exist once:

* **sources** and their roles: the experts in `data.domains` order (default
  `<run.dir>/experts/<d>/weights`), then the seed (`<run.dir>/seed/weights`) when
  `mix.include_seed`; paths from `run_dir.RunDir`, every source a different checkpoint;
* **the expert table** (`experts.py`): which source FFN, or which chunk of which, becomes
  expert i (BTX, `mix.split_experts`, `mix.blended`, upcycling);
* **parameter roles**: every tensor of the MoE is one of `FFN` (expert e = its chunks of the
  sources' FFN, copied exactly), `SHARED` (the weighted mean of the sources' same tensor:
  `acc = w_0 x_0`, then `acc += w_s x_s` in float32, in source order, over the sources whose
  weight is not zero: `Recipe.averaged`) or `ROUTER` (new). Each writer maps its own names
  onto these roles;
* **the weights** of the mean: `mix.average_weights` normalised to sum 1, uniform by default;
* **the routed top-k**: `model.moe.router_topk` x `mix.split_experts`;
* **the router init** (`random`: N(0, init std) per (train.seed, layer), `router_random.py`;
  `zeros`; `data`: the megatron writer's hidden-state means);
* **every input check** on the above, each one line naming the setting, and the check that
  all sources have the same architecture (`check_architecture`).

Everything here is decided from the config (or a writer's explicit arguments) alone, before a
file is read; the FFN width comes in only where chunks are turned into FFN units
(`Recipe.layout`), because the Hugging Face merge learns it from the sources' config.json.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

from nemo_btx.config.schema import SHAPE_FIELDS, ExperimentConfig, ModelConfig, expert_domains, recorded
from nemo_btx.errors import CheckpointError, ConfigError
from nemo_btx.mixing import experts as tables
from nemo_btx.run_dir import WEIGHTS, RunDir

log = logging.getLogger(__name__)

#: Parameter roles (see the module docstring); each writer maps its tensor names onto them.
FFN, SHARED, ROUTER = "ffn", "shared", "router"
#: Source roles.
EXPERT, SEED = "expert", "seed"
#: Router inits; `data` needs the sources' models (the megatron writer computes it).
ROUTER_INITS = ("random", "zeros", "data")
#: ModelConfig fields every source must share: the shape fields a checkpoint is checked on.
ARCHITECTURE_FIELDS = SHAPE_FIELDS


@dataclass(frozen=True)
class Source:
    """One dense model that joins the MoE."""

    name: str
    """Label in logs and manifests: the domain name, `expert<i>`, or `seed`."""
    path: Path
    role: str
    """EXPERT or SEED (the generalist expert; the only source of `upcycle`)."""
    domains: Tuple[str, ...] = ()
    """Domains whose data represents this source (router_init=data)."""


@dataclass(frozen=True)
class Recipe:
    """What the MoE is made of; the writers add only tensor names and I/O."""

    kind: str
    """`mix` or `upcycle` (recorded in the outputs)."""
    sources: Tuple[Source, ...]
    experts: tables.ExpertTable
    """Expert i = the concatenation of the chunks experts[i]."""
    weights: Tuple[float, ...]
    """Per-source weights of the SHARED parameters, normalised to sum 1."""
    router_topk: int
    """Experts each token is routed to (model.moe.router_topk x mix.split_experts)."""
    router_init: str
    router_seed: int
    out: Path
    split_experts: int = 1
    blended: bool = False

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def averaged(self) -> Tuple[Tuple[int, float], ...]:
        """(source, weight) of the terms of every SHARED mean, in the order they are summed:
        source order, sources of weight zero left out (never read)."""
        return tuple((s, w) for s, w in enumerate(self.weights) if w != 0)

    @property
    def expert_sources(self) -> Tuple[int, ...]:
        """The source each expert's router row represents (its first chunk's source)."""
        return tuple(expert[0].source for expert in self.experts)

    def whole_ffn_sources(self) -> Optional[Tuple[int, ...]]:
        """The source of every expert when each expert is one source's whole FFN (BTX,
        upcycling), else None (split or blended experts)."""
        if all(len(e) == 1 and e[0].count == 1 for e in self.experts):
            return self.expert_sources
        return None

    def layout(self, ffn: int) -> tables.ExpertLayout:
        """The expert table in FFN units of sources `ffn` units wide."""
        if self.split_experts != 1 and ffn % self.split_experts:
            raise ConfigError("mix.split_experts", self.split_experts,
                              f"must divide model.ffn_hidden_size={ffn} (each expert FFN is cut "
                              "into equal chunks)")
        if self.blended and ffn % len(self.sources):
            raise ConfigError("mix.blended", True, f"the number of sources ({len(self.sources)}) "
                              f"must divide model.ffn_hidden_size={ffn}")
        return tables.segments(self.experts, ffn)

    def expert_ffn_size(self, ffn: int) -> int:
        return tables.expert_ffn_size(self.layout(ffn))

    def describe_experts(self, ffn: int) -> list:
        """The expert table for manifests: per expert, its (source name, start, length) pieces."""
        return [[{"source": self.sources[seg.source].name, "start": seg.start, "length": seg.length}
                 for seg in expert] for expert in self.layout(ffn)]

    def moe_model(self, dense: ModelConfig) -> ModelConfig:
        """The MoE made of sources shaped `dense`: its experts, top-k and expert FFN width."""
        return dataclasses.replace(
            dense, ffn_hidden_size=self.expert_ffn_size(dense.ffn_hidden_size),
            moe=dataclasses.replace(dense.moe, num_experts=self.num_experts,
                                    router_topk=self.router_topk))

    def router_weight(self, layer: int, hidden: int, std: float):
        """Layer `layer`'s initial router [num_experts, hidden] as float32 numpy (random or
        zeros), or None for router_init=data (computed from the sources' models)."""
        import numpy as np

        from nemo_btx.mixing.router_random import random_router

        if self.router_init == "random":
            return random_router(self.router_seed, layer, self.num_experts, hidden, std)
        if self.router_init == "zeros":
            return np.zeros((self.num_experts, hidden), np.float32)
        return None


# ----------------------------------------------------------------------------- sources


def resolve(path) -> Path:
    return Path(path).expanduser().resolve()


def seed_source(cfg: ExperimentConfig) -> Source:
    """mix.seed_checkpoint, else <run.dir>/seed/weights; it represents every domain."""
    path = cfg.mix.seed_checkpoint or RunDir.of(cfg).seed / WEIGHTS
    return Source("seed", resolve(path), SEED, tuple(d.name for d in cfg.data.domains))


def expert_sources(cfg: ExperimentConfig) -> List[Source]:
    """mix.experts, or <run.dir>/experts/<domain>/weights for every configured domain. Given
    one per expert domain, expert i was trained on the i-th (and is named after it)."""
    domains = expert_domains(cfg)
    if cfg.mix.experts is None:
        run = RunDir.of(cfg)
        return [Source(d, resolve(run.expert(d) / WEIGHTS), EXPERT, (d,)) for d in domains]
    paths = list(cfg.mix.experts)
    if len(paths) == len(domains):
        return [Source(d, resolve(p), EXPERT, (d,)) for d, p in zip(domains, paths)]
    return [Source(f"expert{i}", resolve(p), EXPERT) for i, p in enumerate(paths)]


def check_distinct(sources: Sequence[Source], key: str) -> None:
    """Every source is a different checkpoint (after resolving links)."""
    seen = {}
    for src in sources:
        real = resolve(src.path)
        if real in seen:
            raise ConfigError(key, str(src.path),
                              f"the same checkpoint is used twice ({seen[real]} and {src.name}); "
                              "every expert must be a different checkpoint")
        seen[real] = src.name


def check_out(out: Path, sources: Iterable[Source]) -> None:
    """The output is not a source and does not hold one (it would be replaced)."""
    out = resolve(out)
    for src in sources:
        real = resolve(src.path)
        if real == out or out in real.parents:
            raise ConfigError("mix.out", str(out), f"would overwrite the source {src.path}")


def check_architecture(reference: Tuple[str, Mapping], models: Iterable[Tuple[str, Optional[Mapping]]]) -> None:
    """Every model (where, its ModelConfig fields as a dict; None = not recorded) has the
    reference's ARCHITECTURE_FIELDS; the first difference is named."""
    ref_where, ref = reference
    for where, model in models:
        if model is None:
            continue
        for name in ARCHITECTURE_FIELDS:
            got, want = recorded(model, name), recorded(ref, name)
            if got != want:
                raise CheckpointError(f"{where}: model.{name}={got!r}, but {ref_where} has "
                                      f"{want!r}; all sources must have the same architecture")


# ----------------------------------------------------------------------------- the rules


def normalised_weights(given: Optional[Sequence[float]], n: int) -> Tuple[float, ...]:
    """mix.average_weights (one per source: the experts, then the seed) scaled to sum 1;
    None = uniform."""
    if given is None:
        return (1.0 / n,) * n
    if len(given) != n:
        raise ConfigError("mix.average_weights", list(given),
                          f"needs one weight per source ({n}: the experts, then the seed if "
                          "mix.include_seed)")
    if any(not math.isfinite(w) or w < 0 for w in given) or sum(given) <= 0:
        raise ConfigError("mix.average_weights", list(given),
                          "weights must be finite, >= 0, and not all zero")
    total = float(sum(given))
    return tuple(float(w) / total for w in given)


def expert_table(num_sources: int, split_experts: int = 1, blended: bool = False) -> tables.ExpertTable:
    """BTX (one expert per source), split experts (C per source) or blended experts."""
    if split_experts != 1 and blended:
        raise ConfigError("mix.blended", True, "split experts and blended experts are separate "
                          "ablations; set mix.split_experts=1 or mix.blended=false")
    if blended:
        return tables.blended(num_sources)
    if split_experts != 1:
        return tables.split(num_sources, split_experts)
    return tables.standard(num_sources)


def check_num_experts(want: Optional[int], num_experts: int, num_sources: int, split_experts: int = 1) -> None:
    """model.moe.num_experts is derived; if it is set, it must agree."""
    if want is not None and want != num_experts:
        raise ConfigError("model.moe.num_experts", want,
                          f"mix builds {num_experts} experts from {num_sources} sources"
                          f"{f' x {split_experts} chunks' if split_experts > 1 else ''}; "
                          f"leave it null or set it to {num_experts}")


def routed_topk(topk: int, split_experts: int, num_experts: int) -> int:
    """Split experts route to k*C experts, so a token still touches k FFNs' worth of units."""
    routed = topk * split_experts
    if not 1 <= routed <= num_experts:
        what = (f"top-k x split_experts = {routed} must be" if split_experts != 1 else "must be")
        raise ConfigError("model.moe.router_topk", topk,
                          f"{what} between 1 and the {num_experts} experts")
    return routed


def check_router_init(router_init: str, *, kind: str, blended: bool, batches: int,
                      sources: Sequence[Source]) -> None:
    """router_init=data needs every expert to stand for its own domain(s)."""
    if router_init not in ROUTER_INITS:
        raise ConfigError("mix.router_init", router_init, f"must be one of {', '.join(ROUTER_INITS)}")
    if router_init != "data":
        return
    if kind == "upcycle":
        raise ConfigError("mix.router_init", "data", "upcycling copies one FFN into every expert, "
                          "so no expert has a domain of its own; use random or zeros")
    if blended:
        raise ConfigError("mix.router_init", "data", "blended experts mix every domain, so no "
                          "expert has a domain of its own; use random or zeros")
    if batches < 1:
        raise ConfigError("mix.router_init_batches", batches, "must be >= 1")
    for src in sources:
        if not src.domains:
            raise ConfigError("mix.router_init", "data",
                              f"the domain of {src.path} is unknown: give mix.experts in "
                              "data.domains order (one per domain) or use random/zeros")


# ----------------------------------------------------------------------------- recipes


def build_mix(sources: Sequence[Source], *, out, router_topk: int, average_weights=None,
              split_experts: int = 1, blended: bool = False, num_experts: Optional[int] = None,
              router_init: str = "random", router_seed: int = 1234, router_init_batches: int = 1,
              key: str = "mix.experts") -> Recipe:
    """BTX from explicit settings: the sources (experts, then the seed) become one MoE. `key`
    names the setting that lists the sources (for errors)."""
    sources = tuple(sources)
    if not sources:
        raise ConfigError(key, [], "no sources: give experts or include the seed")
    check_distinct(sources, key)
    n = len(sources)
    table = expert_table(n, split_experts, blended)
    check_num_experts(num_experts, len(table), n, split_experts)
    topk = routed_topk(router_topk, split_experts, len(table))
    check_router_init(router_init, kind="mix", blended=blended, batches=router_init_batches,
                      sources=sources)
    return Recipe(kind="mix", sources=sources, experts=table,
                  weights=normalised_weights(average_weights, n), router_topk=topk,
                  router_init=router_init, router_seed=router_seed, out=resolve(out),
                  split_experts=split_experts, blended=blended)


def mix_recipe(cfg: ExperimentConfig) -> Recipe:
    """`nemo-btx mix`: the experts (and the seed as the generalist, last) become one MoE."""
    mix = cfg.mix
    sources = expert_sources(cfg)
    if mix.include_seed:
        sources.append(seed_source(cfg))
    return build_mix(sources, out=mix.out if mix.out is not None else RunDir.of(cfg).mixed,
                     router_topk=cfg.model.moe.router_topk, average_weights=mix.average_weights,
                     split_experts=mix.split_experts, blended=mix.blended,
                     num_experts=cfg.model.moe.num_experts, router_init=mix.router_init,
                     router_seed=cfg.train.seed, router_init_batches=mix.router_init_batches,
                     key="mix.experts" if mix.experts is not None else "mix.seed_checkpoint")


def upcycle_recipe(cfg: ExperimentConfig) -> Recipe:
    """Sparse upcycling: the seed's FFN in every expert (model.moe.num_experts, else the
    number of domains + 1: the size of the BTX MoE it is compared with)."""
    mix = cfg.mix
    if mix.split_experts != 1 or mix.blended:
        log.warning("upcycle: mix.split_experts and mix.blended are ignored (every expert is "
                    "the seed's whole FFN)")
    if mix.average_weights is not None and list(mix.average_weights) != [1.0]:
        log.warning("upcycle: mix.average_weights is ignored (one source)")
    table = tables.upcycle(cfg.model.moe.num_experts or len(expert_domains(cfg)) + 1)
    sources = (seed_source(cfg),)
    topk = routed_topk(cfg.model.moe.router_topk, 1, len(table))
    check_router_init(mix.router_init, kind="upcycle", blended=False,
                      batches=mix.router_init_batches, sources=sources)
    return Recipe(kind="upcycle", sources=sources, experts=table, weights=(1.0,),
                  router_topk=topk, router_init=mix.router_init, router_seed=cfg.train.seed,
                  out=resolve(mix.out if mix.out is not None else RunDir.of(cfg).upcycled))
