"""Bytes torch allocates for weights, gradients and optimizer state, per rank (run by torchrun).

argv: out.json, then overrides. For dense and MoE, fp32 and bf16, with and without the
distributed optimizer: build the model and optimizer as training does, take one step (Adam's
state exists from then on), and sum the distinct storages behind the parameters, their
main_grad buffers and everything the optimizer holds that is not a parameter's storage.
"""

import json
import os
import sys

import torch

from nemo_btx.config import load_config
from nemo_btx.model.build import build_model, unwrap
from nemo_btx.runtime.distributed import init_runtime, shutdown
from nemo_btx.training.batches import rank_microbatches, synthetic_global_batch
from nemo_btx.training.step import attach_megatron_hooks, build_optimizer, train_step


def storages(tensors):
    out = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def optimizers(opt):
    return list(getattr(opt, "chained_optimizers", None) or [opt])


def measure(cfg, rt):
    from megatron.core import parallel_state

    chunks = build_model(cfg)
    opt, sched = build_optimizer(cfg, chunks)
    attach_megatron_hooks(chunks, opt)
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    train_step(cfg, chunks, opt, sched, rank_microbatches(cfg, synthetic_global_batch(cfg, 0), rank, dp, rt.device))
    params = [p for c in chunks for p in unwrap(c).parameters()]
    weights = storages(params)
    grads = storages(getattr(p, "main_grad", None) for p in params)
    state = []
    for o in optimizers(opt):
        inner = o.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state.append(p)  # fp32 master copies (bf16), or views of the weights (fp32)
                state.extend(v for v in inner.state.get(p, {}).values() if torch.is_tensor(v) and v.dim() > 0)
    optimizer = {k: v for k, v in storages(state).items() if k not in weights and k not in grads}
    return {"weights": sum(weights.values()), "gradients": sum(grads.values()),
            "optimizer": sum(optimizer.values()), "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "params": sum(p.numel() for p in params)}


def main():
    from megatron.core import parallel_state

    out, overrides = sys.argv[1], sys.argv[2:]
    results = []
    rt = None
    for model in ("dense", "moe"):
        for precision in ("fp32", "bf16"):
            for do in (False, True):
                extra = [f"train.precision={precision}", f"parallel.distributed_optimizer={str(do).lower()}"]
                if model == "moe":
                    extra += ["model.moe.num_experts=4", f"parallel.ep={os.environ.get('WORLD_SIZE', '1')}"]
                cfg = load_config([*overrides, *extra])
                rt = init_runtime(cfg)
                results.append({"model": model, "precision": precision, "do": do, "overrides": [*overrides, *extra],
                                "rank": rt.rank, "world": rt.world_size, **measure(cfg, rt)})
                # The next case re-initialises megatron's groups on the same process group.
                parallel_state.destroy_model_parallel()
    shutdown()
    with open(f"{out}.{rt.rank}", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
