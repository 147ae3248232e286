"""The experiment as the planner sees it: every stage at its layout, budget, memory and cost.

`nemo-btx plan` prints it; `validate`, `run` and `launch` refuse a layout whose predicted
per-GPU memory exceeds `cluster.gpu_memory_gb` (plan.check=false runs it anyway). Budgets come
from config/budgets.py (the training stages read the same), the MoE's shape from the mix recipe,
each stage's nodes and world from the Slurm resources rule, so the plan is of the run that
would start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Sequence

from nemo_btx.config.budgets import stage_iters, tokens_per_step
from nemo_btx.config.schema import ExperimentConfig, ModelConfig, ParallelConfig, expert_domains
from nemo_btx.config.validate import min_world_size
from nemo_btx.errors import ConfigError
from nemo_btx.planner import flops, memory
from nemo_btx.planner.params import rank_params, total_params
from nemo_btx.run_dir import BASELINES, baseline

DAY = 86400.0


@dataclass
class StagePlan:
    name: str
    """The unit's name (experts:math, baselines:dense, eval:btx)."""
    kind: str
    """train | convert | eval"""
    model: ModelConfig
    layout: memory.Layout
    layout_name: str
    nodes: int
    recompute: str
    tokens: float = 0.0
    steps: int = 0
    memory: dict = dataclasses.field(default_factory=dict)
    """Per-GPU bytes by part; 'total' is their sum."""
    host_save: float = 0.0
    """Host bytes of a checkpoint save on the busiest node."""
    params: int = 0
    """Parameters on the most loaded GPU (a BTM ensemble: of all its experts)."""
    optimizer_no_do: float = 0.0
    """Training: the optimizer bytes per GPU without the distributed optimizer."""
    step_s: float = 0.0
    gpu_days: float = 0.0

    @property
    def gpus(self) -> int:
        return self.layout.world


def precision_of(cfg: ExperimentConfig) -> str:
    """bf16 on a GPU cluster unless the config says otherwise; fp32 on CPU (model/build.py)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if cfg.cluster.gpus_per_node > 0 else "fp32"


def moe_model(cfg: ExperimentConfig, kind: str) -> ModelConfig:
    """The MoE that `mix` (BTX) or `upcycle` (the baselines) builds, as its recipe says."""
    from nemo_btx.mixing.recipe import mix_recipe, upcycle_recipe

    recipe = mix_recipe(cfg) if kind == "mix" else upcycle_recipe(cfg)
    return recipe.moe_model(cfg.model)


def _layout(cfg: ExperimentConfig, stage: str, overrides: Sequence[str], config_name: str):
    """(layout name, ParallelConfig, world, nodes) of a stage, as its job would get them."""
    from nemo_btx.orchestration.slurm import resources
    from nemo_btx.orchestration.units import layout_config

    name = getattr(cfg.run.layouts, stage)
    if cfg.cluster.gpus_per_node > 0:
        res = resources(cfg, stage, name, overrides, config_name)
        p = res["parallel"] or ParallelConfig()
        return name, p, res["nodes"] * res["procs_per_node"], res["nodes"]
    p = layout_config(name, overrides, config_name) if name else cfg.parallel
    return name, p, p.world_size or min_world_size(p), 1


def _train(cfg, name: str, stage: str, model: ModelConfig, tokens: float, overrides, config_name,
           precision: str) -> StagePlan:
    layout_name, p, world, nodes = _layout(cfg, stage, overrides, config_name)
    layout = memory.Layout.of(p, world)
    gpu = cfg.cluster.gpus_per_node > 0
    mem = memory.training_memory(
        model, layout, precision=precision, micro_batch=cfg.train.micro_batch_size,
        global_batch=cfg.train.global_batch_size, recompute=p.recompute, flash=gpu,
        overhead=cfg.plan.overhead_gb * memory.GB if gpu else 0.0)
    per_step = tokens_per_step(cfg)
    steps = -(-int(tokens) // per_step) if tokens else 0
    step_s = flops.step_seconds(model, per_step, world, peak_flops=cfg.cluster.gpu_peak_tflops * 1e12,
                                mfu=cfg.plan.mfu, recompute=p.recompute)
    parts = {"weights": mem.weights, "gradients": mem.gradients, "optimizer": mem.optimizer,
             "activations": mem.activations, "overhead": mem.overhead}
    parts["total"] = sum(parts.values())
    per_node = max(1, world // nodes)
    return StagePlan(
        name=name, kind="train", model=model, layout=layout, layout_name=layout_name or "parallel",
        nodes=nodes, recompute=p.recompute, tokens=steps * per_step, steps=steps, memory=parts,
        params=rank_params(model, p, mem.pp_rank).total, optimizer_no_do=mem.optimizer_unsharded,
        host_save=memory.checkpoint_host_bytes(model, layout, precision=precision, ranks_per_node=per_node,
                                               gather=cfg.train.optimizer_save_gather),
        step_s=step_s, gpu_days=steps * step_s * world / DAY)


def _convert(cfg, name: str, stage: str, model: ModelConfig, overrides, config_name,
             precision: str) -> StagePlan:
    """mix / upcycle: each rank holds its shard of the MoE and reads one dense source at a time."""
    layout_name, p, world, nodes = _layout(cfg, stage, overrides, config_name)
    layout = memory.Layout.of(p, world)
    moe = max(rank_params(model, p, r).total for r in range(p.pp))
    dense_model = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, num_experts=None))
    dense = max(rank_params(dense_model, p, r).total for r in range(p.pp))
    b = memory.param_bytes(precision)
    parts = {"weights": moe * b, "source": dense * b}
    parts["total"] = sum(parts.values())
    return StagePlan(name=name, kind="convert", model=model, layout=layout,
                     layout_name=layout_name or "parallel", nodes=nodes, recompute="none", memory=parts,
                     params=moe)


def _eval(cfg, name: str, model: ModelConfig, overrides, config_name, precision: str,
          copies: int = 1) -> StagePlan:
    """One evaluated model; `copies` dense models held at once (a BTM ensemble of experts)."""
    layout_name, p, world, nodes = _layout(cfg, "eval", overrides, config_name)
    layout = memory.Layout.of(p, world)
    gpu = cfg.cluster.gpus_per_node > 0
    parts = memory.inference_memory(model, layout, precision=precision, batch=cfg.eval.batch_size,
                                    overhead=cfg.plan.overhead_gb * memory.GB if gpu else 0.0)
    parts = {k: v * (copies if k in ("weights", "kv_cache") else 1) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    params = copies * max(rank_params(model, p, r).total for r in range(p.pp))
    return StagePlan(name=name, kind="eval", model=model, layout=layout, params=params,
                     layout_name=layout_name or "one GPU", nodes=nodes, recompute="none", memory=parts)


def plan_experiment(cfg: ExperimentConfig, overrides: Sequence[str] = (),
                    config_name: str = "config") -> List[StagePlan]:
    """Every stage that runs (or would) for this config, in pipeline order."""
    precision = precision_of(cfg)
    per_step = tokens_per_step(cfg)
    rows: List[StagePlan] = []
    dense = cfg.model
    if cfg.seed.checkpoint is None:
        rows.append(_train(cfg, "seed", "seed", dense, stage_iters(cfg, "seed") * per_step,
                           overrides, config_name, precision))
    experts = expert_domains(cfg)
    for d in experts:
        rows.append(_train(cfg, f"experts:{d}", "experts", dense,
                           stage_iters(cfg, "experts", d) * per_step, overrides, config_name, precision))
    btx = moe_model(cfg, "mix")
    rows.append(_convert(cfg, "mix", "mix", btx, overrides, config_name, precision))
    finetune_tokens = stage_iters(cfg, "finetune") * per_step
    rows.append(_train(cfg, "finetune", "finetune", btx, finetune_tokens, overrides, config_name, precision))
    # Baselines: budgets as training/budget.py will set them from the ledger (tokens for the
    # data-matched one, FLOPs of experts + finetune for the compute-matched ones).
    which = list(cfg.baselines.which)
    if which:
        upcycled = moe_model(cfg, "upcycle")
        if any(w.startswith("upcycle") for w in which):
            rows.append(_convert(cfg, "upcycle", "upcycle", upcycled, overrides, config_name, precision))
        btx_flops = sum(r.tokens * flops.model_flops_per_token(r.model) for r in rows
                        if r.name.startswith("experts:") or r.name == "finetune")
        for w in which:
            b = baseline(w)
            model = upcycled if b.moe else dense
            tokens = finetune_tokens if b.matched == "data" else btx_flops / flops.model_flops_per_token(model)
            rows.append(_train(cfg, b.unit, b.stage, model, tokens, overrides, config_name, precision))
    # Evaluation, one model at a time: the largest of each kind (a dense model, the BTM
    # ensemble, which holds every expert at once, and the MoE).
    rows.append(_eval(cfg, "eval:seed", dense, overrides, config_name, precision))
    rows.append(_eval(cfg, "eval:btm-top2", dense, overrides, config_name, precision,
                      copies=len(experts)))
    rows.append(_eval(cfg, "eval:btx", btx, overrides, config_name, precision))
    return rows


def over_memory(rows: Sequence[StagePlan], limit_gb: float) -> List[StagePlan]:
    return [r for r in rows if r.memory.get("total", 0.0) > limit_gb * memory.GB]


def check_fits(cfg: ExperimentConfig, overrides: Sequence[str] = (), config_name: str = "config") -> None:
    """Refuse a GPU layout predicted over cluster.gpu_memory_gb, naming the stage and the numbers."""
    if cfg.cluster.gpus_per_node == 0 or not cfg.plan.check:
        return
    rows = plan_experiment(cfg, overrides, config_name)
    bad = over_memory(rows, cfg.cluster.gpu_memory_gb)
    if bad:
        r = bad[0]
        parts = ", ".join(f"{k} {v / memory.GB:.1f}" for k, v in r.memory.items() if k != "total")
        raise ConfigError(
            f"run.layouts.{r.name.split(':')[0]}", r.layout_name,
            f"{r.name} is predicted at {r.memory['total'] / memory.GB:.1f} GB per GPU ({parts}; GB) "
            f"over cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g}; see `nemo-btx plan`, choose a "
            "layout with more model parallelism or recomputation (parallel.recompute), or plan.check=false")


# ---------------------------------------------------------------- printing

def _gb(x: float) -> str:
    return f"{x / memory.GB:.1f}"


def _layout_text(r: StagePlan) -> str:
    p = r.layout.parallel
    bits = [f"tp{p.tp}"] + ([f"pp{p.pp}"] if p.pp > 1 else []) + ([f"vp{p.vp}"] if p.vp else []) \
        + ([f"ep{p.ep}"] if p.ep > 1 else []) + [f"dp{r.layout.dp}"]
    return "x".join(bits) + ("/DO" if p.distributed_optimizer else "") + \
        (f"/rc:{r.recompute}" if r.recompute != "none" else "")


def render(cfg: ExperimentConfig, rows: Sequence[StagePlan]) -> str:
    limit = cfg.cluster.gpu_memory_gb
    gpu = cfg.cluster.gpus_per_node > 0
    lines = [f"plan: {cfg.model.name}, {total_params(cfg.model) / 1e9:.2f}B dense; "
             f"{'bf16' if precision_of(cfg) == 'bf16' else 'fp32'}; global batch "
             f"{tokens_per_step(cfg):,} tokens; "
             + (f"{cfg.cluster.gpus_per_node} GPUs/node, {limit:g} GB, {cfg.cluster.gpu_peak_tflops:g} "
                f"TFLOP/s peak at MFU {cfg.plan.mfu:g}" if gpu else "CPU (no GPU memory check)"),
             "",
             f"{'stage':<26} {'layout':<24} {'GPUs':>5} {'params/GPU':>10} {'weights':>8} {'grads':>6} "
             f"{'optim':>6} {'no-DO':>8} {'activ':>6} {'total GB':>8} {'fits':>4} {'host GB':>7}"]
    for r in rows:
        m = r.memory
        fits = "" if not gpu else ("yes" if m["total"] <= limit * memory.GB else "NO")
        unsharded = _gb(r.optimizer_no_do) if r.kind == "train" else ""
        lines.append(
            f"{r.name:<26} {_layout_text(r):<24} {r.gpus:>5} {r.params / 1e9:>9.2f}B "
            f"{_gb(m.get('weights', 0)):>8} {_gb(m.get('gradients', 0)):>6} {_gb(m.get('optimizer', 0)):>6} "
            f"{unsharded:>8} {_gb(m.get('activations', m.get('kv_cache', 0))):>6} {_gb(m['total']):>8} "
            f"{fits:>4} {(_gb(r.host_save) if r.host_save else ''):>7}")
    lines += ["", "layout: /DO distributed optimizer, /rc recomputation; optim: the optimizer state as configured; no-DO: the optimizer state without the distributed optimizer "
              "(fp32 master + Adam moments on every data-parallel rank); activ: activations (eval: KV cache); "
              "host GB: host memory of a checkpoint save on the busiest node", ""]
    lines.append(f"{'stage':<26} {'tokens':>12} {'steps':>8} {'step s':>8} {'GPU-days':>9}")
    for r in rows:
        if r.kind == "train":
            lines.append(f"{r.name:<26} {r.tokens:>12.4g} {r.steps:>8} {r.step_s:>8.2f} {r.gpu_days:>9.1f}")
    lines += ["", *paper_table(rows)]
    return "\n".join(lines)


def paper_table(rows: Sequence[StagePlan]) -> List[str]:
    """Tokens and GPU-days per method, shaped like the paper's Table 3 (the shared seed apart)."""
    by = {r.name: r for r in rows}
    experts = [r for r in rows if r.name.startswith("experts:")]
    e_tok, e_days = sum(r.tokens for r in experts), sum(r.gpu_days for r in experts)
    ft = by.get("finetune")
    methods = [("BTM (experts only)", e_tok, e_days, 0.0, 0.0),
               ("BTX", e_tok, e_days, ft.tokens if ft else 0.0, ft.gpu_days if ft else 0.0)]
    for b in BASELINES:
        if b.unit in by:
            methods.append((b.label, 0.0, 0.0, by[b.unit].tokens, by[b.unit].gpu_days))
    out = [f"{'method':<36} {'expert tokens':>13} {'GPU-days':>9} {'MoE/dense tokens':>16} {'GPU-days':>9} "
           f"{'total tokens':>12} {'GPU-days':>9}"]
    for label, et, ed, mt, md in methods:
        out.append(f"{label:<36} {et:>13.4g} {ed:>9.1f} {mt:>16.4g} {md:>9.1f} {et + mt:>12.4g} {ed + md:>9.1f}")
    return out

