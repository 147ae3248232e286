"""The experiment as a graph of units: one stage process each (a stage, or one item of it).

`plan(cfg)` lists every unit in an order that respects its `needs` (the units whose outputs it
reads). `nemo-btx run` runs them in that order (local.py); `nemo-btx launch` groups them into
one Slurm job per stage and derives the jobs' dependencies from the same graph (slurm.py).
A unit is complete when its completion marker (from nemo_btx/run_dir.py) exists, so both
skip what is done and a killed unit is simply run again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from nemo_btx.config.schema import ExperimentConfig, expert_domains
from nemo_btx.errors import ConfigError
from nemo_btx.run_dir import CHECKPOINT_MARKER, MANIFEST, REPORT_JSON, RunDir, baseline

#: Stages in pipeline order (the names --from / --only take).
STAGES = ("tokenizer", "tokenize", "data", "seed", "branch", "experts", "mix", "finetune", "upcycle",
          "baselines", "dense", "eval", "report")


@dataclass
class Unit:
    """One process of the pipeline: a stage command, or one item of it (a domain, a model)."""

    stage: str
    item: Optional[str]
    args: List[str]
    """CLI arguments after the global overrides: the command and the unit's own overrides."""
    outputs: List[Path]
    """What the unit writes; --from/--only move these aside before redoing it."""
    done: Callable[[], bool]
    needs: Tuple[str, ...] = ()
    """Names of the units whose outputs this one reads."""
    layout: Optional[str] = None
    """conf/parallel preset for this unit (run.layouts.<stage>)."""
    nproc: int = 1
    keep: Tuple[str, ...] = field(default=())
    """Children of an output that a redo keeps (an expert keeps its branched seed)."""

    @property
    def name(self) -> str:
        return self.stage if self.item is None else f"{self.stage}:{self.item}"


def _marker(path: Path) -> Callable[[], bool]:
    return lambda: path.is_file()


def plan(cfg: ExperimentConfig) -> List[Unit]:
    """Every unit of the experiment, each after the units it needs."""
    rd = RunDir.of(cfg)
    names = expert_domains(cfg)  # (a general domain, expert: false, has data but no expert)
    layouts = cfg.run.layouts
    experts = tuple(f"experts:{d}" for d in names)
    units = data_units(cfg)
    units += [
        Unit("seed", None, ["seed"], [rd.seed], _marker(rd.seed / MANIFEST),
             tuple(u.name for u in units if u.stage == "data"), layouts.seed),
        Unit("branch", None, ["branch"], [rd.expert_init(d) for d in names],
             lambda: all((rd.expert_init(d) / CHECKPOINT_MARKER).is_file() for d in names), ("seed",)),
    ]
    for d in names:
        units.append(Unit("experts", d, ["train-expert", f"domain={d}"], [rd.expert(d)],
                          _marker(rd.expert(d) / MANIFEST), ("branch",), layouts.experts,
                          keep=(rd.expert_init(d).name,)))
    units += [
        Unit("mix", None, ["mix"], [rd.mixed], _marker(rd.mixed / MANIFEST), experts, layouts.mix),
        Unit("finetune", None, ["finetune"], [rd.finetuned], _marker(rd.finetuned / MANIFEST), ("mix",),
             layouts.finetune),
    ]
    which = list(cfg.baselines.which)
    if any(baseline(b).moe for b in which):
        units.append(Unit("upcycle", None, ["upcycle"], [rd.upcycled], _marker(rd.upcycled / MANIFEST),
                          ("seed",), layouts.upcycle))
    for name in which:
        out, b = rd.baseline(name), baseline(name)
        # Every baseline is matched to BTX's finetune (steps or FLOPs from the ledger). The dense
        # one is a stage of its own: it trains at a dense layout, the MoE ones at an MoE layout.
        needs = ("finetune", "upcycle") if b.moe else ("seed", "finetune")
        units.append(Unit(b.stage, name if b.moe else None, ["baselines", f"baselines.which=[{name}]"],
                          [out], _marker(out / MANIFEST), needs,
                          layouts.baselines if b.moe else layouts.dense))
    evals = []
    for model in rd.models(names, which):
        if cfg.eval.models is not None and model.name not in cfg.eval.models:
            continue
        evals.append(Unit("eval", model.name, ["eval", f"eval.model={model.name}"], [rd.eval_dir(model.name)],
                          _eval_done(cfg, model.name), model.needs, layouts.eval))
    units = after_needs(units, evals)
    units.append(Unit("report", None, ["report"], [rd.report], _marker(rd.report / REPORT_JSON),
                      tuple(u.name for u in evals)))
    _check_graph(units)
    return units


def after_needs(units: List[Unit], evals: List[Unit]) -> List[Unit]:
    """`units` with each evaluation placed right after the last unit it needs: a model is
    evaluated as soon as it exists (the seed while the experts train, an expert while the next
    one trains), not after every baseline."""
    out = list(units)
    for unit in evals:
        last = max((i for i, u in enumerate(out) if u.name in unit.needs), default=len(out) - 1)
        # after that unit and the evaluations already placed behind it (their order is kept)
        while last + 1 < len(out) and out[last + 1].stage == "eval":
            last += 1
        out.insert(last + 1, unit)
    return out


def data_units(cfg: ExperimentConfig) -> List[Unit]:
    """The data stage's units (nemo_btx/data/plan.py): the tokenizer; one tokenize unit per
    group of a domain's pieces (a Slurm array task each); one merge per domain (`data:<domain>`),
    which also tokenizes a domain of a single group (one process instead of two)."""
    from nemo_btx.data.plan import plan_data
    from nemo_btx.data.shards import marker_path
    from nemo_btx.stages import data as stage

    rd = RunDir.of(cfg)
    plans = plan_data(cfg)
    units = [Unit("tokenizer", None, ["data", "data.step=tokenizer"], [rd.tokenizer],
                  lambda: stage.tokenizer_done(cfg, plans))]
    merges = []
    for plan in plans:
        if len(plan.units) <= 1:  # tokenized and merged by one process (an external one: checked)
            step = "merge" if plan.external else "domain"
            outputs = [marker_path(rd.root, plan.name, p.id) for p in plan.pieces] + [rd.data_manifest(plan.name)]
            merges.append(Unit("data", plan.name, ["data", f"data.step={step}", f"domain={plan.name}"],
                               outputs, lambda plan=plan: stage.domain_done(cfg, plan), ("tokenizer",)))
            continue
        mine = []
        for k, item in enumerate(plan.unit_names()):
            pieces = plan.unit_pieces(k)
            units.append(Unit("tokenize", item, ["data", "data.step=tokenize", f"data.unit={item}"],
                              [marker_path(rd.root, plan.name, p.id) for p in pieces],
                              lambda plan=plan, k=k: stage.unit_done(cfg, plan, k), ("tokenizer",)))
            mine.append(units[-1].name)
        merges.append(Unit("data", plan.name, ["data", "data.step=merge", f"domain={plan.name}"],
                           [rd.data_manifest(plan.name)], lambda plan=plan: stage.domain_done(cfg, plan),
                           ("tokenizer", *mine)))
    return units + merges


def _eval_done(cfg: ExperimentConfig, name: str) -> Callable[[], bool]:
    def done() -> bool:
        # Complete = results of the model's current checkpoint (not of a replaced one).
        from nemo_btx.stages.evaluate import is_current

        return is_current(cfg, name)
    return done


def _check_graph(units: List[Unit]) -> None:
    seen = set()
    for u in units:
        missing = [n for n in u.needs if n not in seen]
        assert not missing, f"unit {u.name} needs {missing}, which are not planned before it"
        seen.add(u.name)


def pending(units: Sequence[Unit]) -> List[Unit]:
    """Units to run: those not complete, and every evaluation (and the report) downstream of one
    of them — an evaluation's results are of the checkpoint that existed when it ran, so a model
    about to be (re)trained is evaluated again; its results are keyed by checkpoint identity,
    so an unchanged one is skipped by the stage itself."""
    out, names = [], set()
    for u in units:
        if not u.done() or (u.stage in ("eval", "report") and any(n in names for n in u.needs)):
            out.append(u)
            names.add(u.name)
    return out


def with_missing_needs(units: Sequence[Unit], chosen: Sequence[Unit]) -> List[Unit]:
    """`chosen` and every incomplete unit it needs (transitively), in plan order: `--only data`
    on a fresh run directory trains the tokenizer first instead of failing for want of it;
    complete needs are not redone."""
    by_name = {u.name: u for u in units}
    keep = {id(u) for u in chosen}
    stack = list(chosen)
    while stack:
        for name in stack.pop().needs:
            need = by_name[name]
            if id(need) not in keep and not need.done():
                keep.add(id(need))
                stack.append(need)
    return [u for u in units if id(u) in keep]


def select(units: List[Unit], from_stage: Optional[str], only: Optional[str],
           flag: str = "--only") -> List[Unit]:
    """The units to redo: `--from STAGE[:ITEM]` (it and everything after), `--only A,B:ITEM`."""
    def matches(unit: Unit, spec: str) -> bool:
        stage, _, item = spec.partition(":")
        return unit.stage == stage and (not item or unit.item == item)

    def check(spec: str, flag: str) -> None:
        stage, _, item = spec.partition(":")
        if stage not in STAGES:
            raise ConfigError(flag, spec, f"must be a stage: {', '.join(STAGES)} (optionally STAGE:ITEM)")
        if item and not any(matches(u, spec) for u in units):
            items = [u.item for u in units if u.stage == stage and u.item]
            raise ConfigError(flag, spec, f"no such item; {stage} has: {', '.join(items) or 'no items'}")

    if from_stage and only:
        raise ConfigError("--from", from_stage, "give --from or --only, not both")
    if from_stage:
        check(from_stage, "--from")
        # From the given unit (or the stage's first; a stage without units here starts at the
        # next one) on, in plan order: its stage and later ones. Evaluations are planned right
        # after their models, so those of models made before it are not redone.
        stage, _, item = from_stage.partition(":")
        order = STAGES.index(stage)

        def starts(u: Unit) -> bool:
            if item:
                return matches(u, from_stage)
            return STAGES.index(u.stage) >= order and (u.stage != "eval" or stage == "eval")

        first = next((i for i, u in enumerate(units) if starts(u)), len(units))
        return [u for u in units[first:] if STAGES.index(u.stage) >= order]
    if only:
        specs = [s for s in only.split(",") if s]
        for s in specs:
            check(s, flag)
        return [u for u in units if any(matches(u, s) for s in specs)]
    return []


def nproc_of(layout: Optional[str], overrides: Sequence[str], config_name: str,
             gpus: int = 0, stage: str = "") -> int:
    """Processes a stage runs with on one machine (`nemo-btx run`) at its layout: its
    parallel.world_size, else on a machine of `gpus` GPUs (cluster.gpus_per_node) all of them
    (data parallel fills the node), else on CPU the smallest world the layout fits."""
    if layout is None:
        return 1
    from nemo_btx.config.validate import min_world_size

    p = layout_config(layout, overrides, config_name)
    if not gpus:
        return p.world_size or min_world_size(p)
    world = p.world_size or gpus
    need = min_world_size(p)
    if world > gpus or world % need:
        raise ConfigError(f"run.layouts.{stage}", layout,
                          f"needs {world} GPUs (a multiple of {need}); `nemo-btx run` uses one machine of "
                          f"cluster.gpus_per_node={gpus}: submit with `nemo-btx launch`, or pick a layout "
                          "for one node (e.g. llama2_7b_moe_h100_1node for the MoE stages)")
    return world


def layout_config(layout: str, overrides: Sequence[str], config_name: str):
    """The ParallelConfig of a conf/parallel preset, under the experiment's overrides."""
    from nemo_btx.config import load_config

    return load_config([*overrides, f"parallel={layout}"], config_name=config_name).parallel


def command(unit: Unit, overrides: Sequence[str], config_name: str,
            python: Optional[str] = None) -> List[str]:
    """The command line a unit runs (what a cluster job script runs for it, too)."""
    cli = ["-m", "nemo_btx.cli", "--config-name", config_name, *unit.args, *overrides]
    if unit.layout:
        cli.append(f"parallel={unit.layout}")
    python = python or sys.executable
    if unit.nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={unit.nproc}", *cli]
    return [python, *cli]
