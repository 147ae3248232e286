"""One MoE training step (4 experts, top-2) versus one dense step on the same tokens.

Issue 5's target: the measured time ratio MoE/dense within 1.25x of their FLOP ratio (by
formula, `model_flops_per_token`), on CPU. Both models are built in one process and stepped
alternately on the same global batches, so machine noise hits both.

    .venv/bin/python bench/moe_step.py --steps 20 [key=value ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--dispatchers", default="alltoall,allgather")
    parser.add_argument("--json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from nemo_btx.config import load_config
    from nemo_btx.log import init_logger
    from nemo_btx.model.build import build_model, model_flops_per_token
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training.batches import rank_microbatches, synthetic_global_batch
    from nemo_btx.training.step import attach_megatron_hooks, build_optimizer, train_step

    init_logger("WARNING")
    base = load_config(args.overrides)
    rt = init_runtime(base)
    variants = {"dense": base}
    for disp in args.dispatchers.split(","):
        moe = dataclasses.replace(base.model.moe, num_experts=args.experts, router_topk=2,
                                  token_dispatcher_type=disp)
        variants[f"moe-{disp}"] = dataclasses.replace(base, model=dataclasses.replace(base.model, moe=moe))
    built = {}
    for name, cfg in variants.items():
        chunks = build_model(cfg)
        opt, sched = build_optimizer(cfg, chunks)
        built[name] = (cfg, chunks, opt, sched)
    times = {name: [] for name in variants}
    for step in range(args.warmup + args.steps):
        tokens = synthetic_global_batch(base, step)
        for name, (cfg, chunks, opt, sched) in built.items():
            attach_megatron_hooks(chunks, opt)
            micro = rank_microbatches(cfg, tokens, 0, 1, rt.device)
            t0 = time.perf_counter()
            train_step(cfg, chunks, opt, sched, micro)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    shutdown()
    dense_t = statistics.median(times["dense"])
    dense_f = model_flops_per_token(base.model)
    rows = {}
    print(f"{'model':<16}{'median step':>14}{'time ratio':>12}{'FLOP ratio':>12}{'time/FLOP':>11}")
    for name, (cfg, *_rest) in built.items():
        t = statistics.median(times[name])
        flop_ratio = model_flops_per_token(cfg.model) / dense_f
        rows[name] = {"median_s": t, "time_ratio": t / dense_t, "flop_ratio": flop_ratio,
                      "time_over_flop_ratio": (t / dense_t) / flop_ratio, "steps": times[name]}
        print(f"{name:<16}{t * 1000:>12.1f}ms{t / dense_t:>12.2f}{flop_ratio:>12.2f}"
              f"{(t / dense_t) / flop_ratio:>11.2f}")
    print(f"threads {torch.get_num_threads()}; target: time/FLOP <= 1.25 for the MoE rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
