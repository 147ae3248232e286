"""`nemo-btx plan`'s per-GPU memory beside an independent formula: Megatron-LM's published
theoretical-memory accounting (Korthikanti et al. 2022, as in Megatron-LM's
megatron/training/theoretical_memory_usage.py), for the paper's two models on their layouts.

    .venv/bin/python bench/plan_vs_formula.py [--json runs/bench/plan_vs_formula.json]

Megatron-LM's formula, restated (not its code):
  weights + gradients + optimizer, bytes per parameter of the most loaded shard:
      18 without the distributed optimizer, 6 + 12/DP with it (experts: their own DP);
  activations of the first pipeline stage, selective recomputation and sequence parallel:
      per layer  s*b*h*(18 + 4*f/h) / t   (f: the FFN width; for a top-k MoE layer we give its
                 MLP term k copies, 4*k*f/h: the formula itself predates routed experts),
      times all L layers (the first stage holds pp micro-batches of L/pp layers),
      plus the embedding's input and dropout (8*s*b*pp + s*b*h*pp) and the output layer
      (4*s*b*h*(1 + V/h) / t).
No GPU needed; pure arithmetic on both sides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_btx.config import load_config  # noqa: E402
from nemo_btx.config.validate import etp_of  # noqa: E402
from nemo_btx.planner import memory  # noqa: E402
from nemo_btx.planner.params import padded_vocab_size, rank_params  # noqa: E402

GB = 1e9


def megatron_lm_formula(m, layout: memory.Layout, micro_batch: int) -> dict:
    p = layout.parallel
    params = rank_params(m, p, 0)
    per_param = (lambda dp: 6 + 12 / dp) if p.distributed_optimizer else (lambda dp: 18)
    state = params.dense * per_param(layout.dp) + params.expert * per_param(layout.edp)
    s, b, h, t = m.seq_length, micro_batch, m.hidden_size, p.tp
    k = m.moe.router_topk if m.moe.num_experts else 1
    per_layer = s * b * h * (18 + 4 * k * m.ffn_hidden_size / h) / t
    act = per_layer * m.num_layers
    act += (8 * s * b * p.pp + s * b * h * p.pp) / t
    act += 4 * s * b * h * (1 + padded_vocab_size(m, t) / h) / t
    return {"state": state, "activations": act, "total": state + act}


def ours(m, layout: memory.Layout, cfg) -> dict:
    mem = memory.training_memory(m, layout, precision="bf16", micro_batch=cfg.train.micro_batch_size,
                                 global_batch=cfg.train.global_batch_size, recompute="selective",
                                 flash=True, overhead=0.0)
    state = mem.weights + mem.gradients + mem.optimizer
    return {"state": state, "activations": mem.activations, "total": state + mem.activations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = load_config(["experiment=llama2_7b_h100"])
    from nemo_btx.orchestration.units import layout_config

    cases = []
    dense = cfg.model
    moe = load_config(["experiment=llama2_7b_h100", "model.moe.num_experts=4"]).model
    for name, model, preset in (("Llama-2 7B expert", dense, "llama2_7b_h100"),
                                ("4x7B BTX MoE (finetune)", moe, "llama2_7b_moe_h100"),
                                ("4x7B BTX MoE, one node", moe, "llama2_7b_moe_h100_1node")):
        p = layout_config(preset, ["experiment=llama2_7b_h100"], "config")
        layout = memory.Layout.of(p, p.world_size or cfg.cluster.gpus_per_node)  # a node, as `plan`
        a, b = ours(model, layout, cfg), megatron_lm_formula(model, layout, cfg.train.micro_batch_size)
        cases.append({"model": name, "layout": preset, "world": layout.world, "tp": p.tp, "ep": p.ep,
                      "etp": etp_of(p), "dp": layout.dp, "edp": layout.edp, "ours": a, "megatron_lm": b})
    print(f"{'model':<26} {'layout':<26} {'part':<12} {'plan GB':>8} {'Megatron-LM GB':>15} {'ratio':>6}")
    for c in cases:
        for part in ("state", "activations", "total"):
            x, y = c["ours"][part] / GB, c["megatron_lm"][part] / GB
            print(f"{c['model']:<26} {c['layout'] + ' (' + str(c['world']) + ' GPUs)':<26} {part:<12} "
                  f"{x:>8.1f} {y:>15.1f} {x / y:>6.2f}")
    print("(state: weights + gradients + optimizer; activations with selective recomputation, sequence "
          "parallel, flash attention, micro-batch 1; the plan's overhead_gb left out on both sides)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(cases, indent=1))


if __name__ == "__main__":
    main()
