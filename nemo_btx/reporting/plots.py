"""The report's figures, drawn with matplotlib's Agg renderer into PNG files.

Figures are built as `Figure` objects on an Agg canvas rather than through pyplot: no global
state, no display needed (a login node or a CI machine has none), nothing left open between
calls. Every function returns the file it wrote, or None when the run has nothing to draw yet.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from nemo_btx.run_dir import BASELINE_NAMES

DPI = 110
#: Fixed colours so a model looks the same in every figure.
FIXED = {"seed": "#555555", "btx": "#d62728", "btm-top1": "#9467bd", "btm-top2": "#8c564b",
         "upcycle-data": "#e377c2", "upcycle-compute": "#bcbd22", "dense": "#17becf"}
EXPERT_COLOURS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#7f7f7f", "#aec7e8", "#98df8a", "#ffbb78"]


def colours(names: List[str]) -> Dict[str, str]:
    out, experts = {}, [n for n in names if n.startswith("expert-")]
    for n in names:
        out[n] = FIXED.get(n) or EXPERT_COLOURS[experts.index(n) % len(EXPERT_COLOURS)]
    return out


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _tokens_axis(ax) -> None:
    ax.set_xlabel("tokens trained in the stage")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _ema(values: List[float], span: int) -> List[float]:
    """Exponential moving average: per-step losses of small batches are too noisy to compare."""
    alpha, out, acc = 2.0 / (span + 1), [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _grid(n: int, ncols: int):
    cols = max(1, min(n, ncols))
    return cols, math.ceil(n / cols)


def loss_curves(data: dict, path: Path) -> Optional[Path]:
    """Training loss against tokens: the seed and its experts, then the MoE and its baselines."""
    stages = data["stages"]
    groups = [("Seed and domain experts", [n for n in stages if n == "seed" or n.startswith("expert-")]),
              ("MoE finetune and baselines", [n for n in stages if n == "btx" or n in BASELINE_NAMES])]
    groups = [(t, ns) for t, ns in groups if any(stages[n]["curve"]["loss"] for n in ns)]
    if not groups:
        return None
    col = colours(list(data["models"]))
    fig = Figure(figsize=(6 * len(groups), 4.2), layout="constrained")
    for i, (title, names) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for n in names:
            c = stages[n]["curve"]
            if not c["loss"]:
                continue
            span = max(1, len(c["loss"]) // 20)
            ax.plot(c["tokens"], c["loss"], color=col[n], alpha=0.18, linewidth=0.8)
            ax.plot(c["tokens"], _ema(c["loss"], span), color=col[n], linewidth=1.8,
                    label=stages[n]["label"])
        ax.set_title(title)
        _tokens_axis(ax)
        ax.set_ylabel("training loss (EMA; raw faint)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def valid_curves(data: dict, path: Path) -> Optional[Path]:
    """Held-out loss per domain during training, one panel per domain."""
    stages, domains = data["stages"], data["domains"]
    if not any(stages[n]["valid"].get(d, {}).get("loss") for n in stages for d in domains):
        return None
    col = colours(list(data["models"]))
    ncols, nrows = _grid(len(domains), 3)
    fig = Figure(figsize=(5 * ncols, 3.8 * nrows + 0.8), layout="constrained")
    for i, d in enumerate(domains):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for n, st in stages.items():
            v = st["valid"].get(d)
            if v and v["loss"]:
                ax.plot(v["tokens"], v["loss"], marker="o", markersize=3, color=col[n],
                        linewidth=2.2 if n == "btx" else 1.3, label=st["label"])
        ax.set_title(f"{d}: validation loss")
        _tokens_axis(ax)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    # One legend for all panels, below them: inside a panel it hides the curves.
    seen = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    handles, labels = list(seen.values()), list(seen)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=9)
    return _save(fig, path)


def routing_heatmap(data: dict, path: Path) -> Optional[Path]:
    """Share of each domain's top-k assignments per expert, one panel per layer."""
    r = data.get("routing")
    if not r:
        return None
    layers = sorted({int(l) for by in r["fractions"].values() for l in by})
    domains = [d for d in r["domains"] if d in r["fractions"]]
    if not layers or not domains:
        return None
    ncols, nrows = _grid(len(layers), 4)
    width = max(3.2, 0.75 * len(r["experts"]) + 1.2)
    fig = Figure(figsize=(width * ncols + 1.0, (0.6 * len(domains) + 1.6) * nrows), layout="constrained")
    vmax = max(x for d in domains for s in r["fractions"][d].values() for x in s)
    image = None
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        grid = [r["fractions"][d].get(str(layer)) or [0.0] * r["num_experts"] for d in domains]
        image = ax.imshow(grid, cmap="Blues", vmin=0, vmax=vmax, aspect="auto")
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                ax.text(x, y, f"{100 * v:.0f}", ha="center", va="center", fontsize=10,
                        color="white" if v > 0.6 * vmax else "black")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xticks(range(len(r["experts"])), r["experts"], fontsize=9, rotation=30)
        ax.set_yticks(range(len(domains)), domains if i % ncols == 0 else [], fontsize=9)
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="share of top-k assignments")
    fig.suptitle(f"BTX routing: domain (rows) → expert (columns), % of top-{r['router_topk']} assignments")
    return _save(fig, path)


def score_bars(data: dict, path: Path) -> Optional[Path]:
    """Every model on every task and domain perplexity, one panel per column of Table 1."""
    models = data["models"]
    panels = [(t["title"] + " (%)", lambda m, k=t["key"]: _times100(m["tasks"].get(k)), "higher")
              for t in data["tasks"]]
    panels += [(f"PPL {d}", lambda m, d=d: (m["perplexity"].get(d) or {}).get("value"), "lower")
               for d in data["domains"]]
    if not any(get(m) is not None for _, get, _ in panels for m in models.values()):
        return None
    names = list(models)
    col = colours(names)
    ncols, nrows = _grid(len(panels), 3)
    fig = Figure(figsize=(4.6 * ncols + 1.4, (0.3 * len(names) + 1.2) * nrows), layout="constrained")
    for i, (title, get, better) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        values = [get(models[n]) for n in names]
        present = [v for v in values if v is not None]
        ys = list(range(len(names)))
        if better == "lower":
            # Perplexities of experts off their domain can be 100x the rest: a log axis keeps
            # every bar readable. Bars start at 1, the smallest possible perplexity.
            ax.set_xscale("log")
            ax.barh(ys, [(v or 1) - 1 for v in values], left=1, color=[col[n] for n in names])
            top = max(present or [10])
            ax.set_xlim(1, top * 6)
            label_at = [(v or 1) * 1.08 for v in values]
        else:
            ax.barh(ys, [v or 0 for v in values], color=[col[n] for n in names])
            top = max(present + [10])
            ax.set_xlim(0, min(100, top * 1.25))
            label_at = [(v or 0) + 0.01 * top for v in values]
        for y, x, v in zip(ys, label_at, values):
            ax.text(x, y, "–" if v is None else f"{v:.1f}", va="center", fontsize=9)
        ax.set_yticks(ys, [models[n]["label"] for n in names] if i % ncols == 0 else [], fontsize=10)
        ax.invert_yaxis()
        ax.set_title(f"{title}, {better} is better", fontsize=11)
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _times100(x: Optional[float]) -> Optional[float]:
    return None if x is None else 100 * x


#: file name -> (function name, caption); the report shows them in this order. Looked up by name
#: at draw time, so a replaced function (a test's, a user's) is the one that runs.
FIGURES = {
    "loss_curves.png": ("loss_curves", "Training loss of every training stage against the tokens it trained on."),
    "valid_curves.png": ("valid_curves", "Held-out validation loss per domain during training."),
    "routing.png": ("routing_heatmap", "Where BTX's router sends each domain's tokens, per layer "
                                       "(share of top-k assignments per expert, %)."),
    "scores.png": ("score_bars", "Task scores and perplexity per model (Table 1 as bars)."),
}


def draw_all(data: dict, out_dir: Path) -> Dict[str, str]:
    """Draw every figure there is data for; file name -> caption."""
    drawn = {}
    for name, (fn, caption) in FIGURES.items():
        if globals()[fn](data, Path(out_dir) / name) is not None:
            drawn[name] = caption
    return drawn
