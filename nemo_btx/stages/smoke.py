"""Smoke stage: build the tiny dense and MoE models and train each for a few steps.

It exercises the whole foundation (config, runtime, CPU redirections, model building, the
megatron-core schedule, DDP, optimizer and LR schedule) in under a minute on 2 CPU cores, and
records losses and throughput in `<run.dir>/smoke/result.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from nemo_btx.artifacts import software_versions, write_json_atomic, write_text_atomic
from nemo_btx.config import to_yaml, validate
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.run_dir import CONFIG, RunDir

log = logging.getLogger(__name__)


def variant_config(cfg: ExperimentConfig, variant: str) -> ExperimentConfig:
    """The dense variant drops the MoE settings; the MoE variant makes sure experts exist."""
    moe = cfg.model.moe
    if variant == "dense":
        moe = dataclasses.replace(moe, num_experts=None)
    elif moe.num_experts is None:
        moe = dataclasses.replace(moe, num_experts=cfg.smoke.moe_num_experts)
    model = dataclasses.replace(cfg.model, moe=moe)
    steps = cfg.smoke.steps
    train = dataclasses.replace(cfg.train, train_iters=steps,
                                warmup_iters=min(cfg.train.warmup_iters, steps - 1))
    return dataclasses.replace(cfg, model=model, train=train)


def run(cfg: ExperimentConfig) -> dict:
    from megatron.core import parallel_state

    from nemo_btx.model.build import build_model, count_parameters, model_flops_per_token
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training.batches import rank_microbatches, synthetic_global_batch
    from nemo_btx.training.step import attach_megatron_hooks, build_optimizer, train_step

    for variant in cfg.smoke.models:  # fail on a bad variant before any process group exists
        validate(variant_config(cfg, variant))
    rt = init_runtime(cfg)
    results = {}
    try:
        for variant in cfg.smoke.models:
            vcfg = variant_config(cfg, variant)
            chunks = build_model(vcfg)
            optimizer, scheduler = build_optimizer(vcfg, chunks)
            attach_megatron_hooks(chunks, optimizer)
            dp_rank = parallel_state.get_data_parallel_rank()
            tokens_per_step = vcfg.train.global_batch_size * vcfg.model.seq_length
            losses, start = [], time.perf_counter()
            for step in range(vcfg.smoke.steps):
                batch = synthetic_global_batch(vcfg, step)
                micro = rank_microbatches(vcfg, batch, dp_rank, rt.dp_size, rt.device)
                r = train_step(vcfg, chunks, optimizer, scheduler, micro)
                losses.append(r.loss)
                elapsed = time.perf_counter() - start
                log.info("%s step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f", variant,
                         step + 1, vcfg.smoke.steps, r.loss, r.lr, r.grad_norm,
                         tokens_per_step * (step + 1) / elapsed)
            elapsed = time.perf_counter() - start
            results[variant] = {
                "parameters_on_rank0": count_parameters(chunks),
                "losses": losses,
                "tokens_per_second": tokens_per_step * len(losses) / elapsed,
                "train_flops_per_token": model_flops_per_token(vcfg.model),
                "seconds": elapsed,
            }
            del chunks, optimizer, scheduler
    finally:
        shutdown()
    if rt.is_main:
        out = RunDir.of(cfg).smoke
        write_json_atomic(out / "result.json", {
            "results": results, "world_size": rt.world_size, "device": str(rt.device),
            "cpu_redirections": list(rt.cpu_redirections), "versions": software_versions(),
        })
        write_text_atomic(out / CONFIG, to_yaml(cfg))
        for variant, res in results.items():
            log.info("smoke %s: loss %.3f -> %.3f over %d steps, %.0f tokens/s", variant,
                     res["losses"][0], res["losses"][-1], len(res["losses"]), res["tokens_per_second"])
    return results
