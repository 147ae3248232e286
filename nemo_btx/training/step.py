"""One optimizer step on megatron-core: schedule, loss, optimizer and LR schedule.

Dense and MoE models share this code. The pipeline schedule from `get_forward_backward_func`
runs the micro-batches (1F1B, interleaved, or no pipelining), megatron DDP reduces gradients
over data-parallel ranks, and the megatron optimizer clips, steps and (on GPU) keeps fp32 main
weights. The MoE load-balancing loss needs nothing here: megatron-core's router attaches it to
the activations, so its gradient reaches the router weights during backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List

import torch

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.model.build import params_dtype


@dataclass
class StepResult:
    loss: float
    """Mean language-model loss over the global batch (identical on every rank)."""
    grad_norm: float
    lr: float
    skipped: bool
    """True when the optimizer skipped the update (inf/nan gradients under loss scaling)."""


def build_optimizer(cfg: ExperimentConfig, chunks: List[torch.nn.Module]):
    """megatron AdamW (decoupled weight decay) and the warmup + cosine-to-min LR schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    dtype = params_dtype(cfg)
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.lr * t.min_lr_ratio,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(ocfg, chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_iters else t.lr,
        max_lr=t.lr,
        min_lr=t.lr * t.min_lr_ratio,
        lr_warmup_steps=t.warmup_iters,
        lr_decay_steps=t.train_iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def attach_megatron_hooks(chunks: List[torch.nn.Module], optimizer) -> None:
    """Tell the schedules how to sync grads: DDP no_sync / finalize across DP, TP and PP."""
    from megatron.core.distributed import finalize_model_grads

    config = chunks[0].module.config if hasattr(chunks[0], "module") else chunks[0].config
    config.no_sync_func = [c.no_sync for c in chunks]
    if len(chunks) == 1:
        config.no_sync_func = config.no_sync_func[0]
    overlap = getattr(getattr(chunks[0], "ddp_config", None), "overlap_grad_reduce", False)
    if overlap and (len(chunks) > 1 or config.pipeline_model_parallel_size > 1):
        # With overlap under PP, the schedule starts each chunk's gradient sync itself.
        config.grad_sync_func = [c.start_grad_sync for c in chunks]
        if len(chunks) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss


def gather_params(chunks: List[torch.nn.Module]) -> None:
    """Collective: make every rank's parameters the ones after the last optimizer step.

    With parallel.overlap_param_gather the distributed optimizer's updated shards are
    all-gathered bucket by bucket during the next forward pass, so between a step and that
    forward each rank holds other ranks' shards as they were before the step. A checkpoint
    taken then would save them; call this before saving (megatron-LM forces the same sync).
    """
    for chunk in chunks:
        ddp = getattr(chunk, "ddp_config", None)
        if ddp is not None and ddp.use_distributed_optimizer and ddp.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean token loss of one micro-batch; the schedule averages over micro-batches."""
    losses = output_tensor.float()
    mask = loss_mask.float()
    loss = torch.sum(losses.view(-1) * mask.view(-1)) / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model: torch.nn.Module):
    """The schedules' forward hook: one micro-batch through one model chunk.

    Every pipeline stage draws from the iterator so all stages stay on the same micro-batch;
    only the first stage uses the tokens and only the last the labels.
    """
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _run_schedule(cfg: ExperimentConfig, chunks, microbatches, forward_only: bool) -> float:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t, m = cfg.train, cfg.model
    num_micro = t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())
    assert len(microbatches) == num_micro, (len(microbatches), num_micro)
    # Interleaved PP wants one iterator per model chunk; each walks the same micro-batches.
    iters = [iter(microbatches) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_micro,
        seq_length=m.seq_length,
        micro_batch_size=t.micro_batch_size,
        forward_only=forward_only,
    )
    return _reduce_loss(losses)


def train_step(cfg: ExperimentConfig, chunks, optimizer, scheduler,
               microbatches: List[Dict[str, torch.Tensor]]) -> StepResult:
    """Forward/backward over this rank's micro-batches of one global batch, then one step.

    `microbatches` is this data-parallel rank's share of the global batch, already on device.
    """
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = _run_schedule(cfg, chunks, microbatches, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return StepResult(loss=loss, grad_norm=float(grad_norm or 0.0),
                      lr=optimizer.param_groups[0]["lr"], skipped=not ok)


@torch.no_grad()
def eval_loss(cfg: ExperimentConfig, chunks, microbatches: List[Dict[str, torch.Tensor]]) -> float:
    """Mean token loss of one global batch without touching gradients or optimizer state."""
    for chunk in chunks:
        chunk.eval()
    try:
        return _run_schedule(cfg, chunks, microbatches, forward_only=True)
    finally:
        for chunk in chunks:
            chunk.train()


def _reduce_loss(losses: List[Dict[str, torch.Tensor]]) -> float:
    """Average the micro-batch losses (on the last stage) over DP, then share it with all stages."""
    from megatron.core import parallel_state

    value = torch.zeros(1, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
        value[0] = float(torch.stack([d["lm loss"] for d in losses]).mean())
        # Mean over data-parallel ranks (each saw a different slice of the global batch).
        if parallel_state.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
            value /= parallel_state.get_data_parallel_world_size()
    # Pipeline ranks other than the last hold no loss: broadcast it from the last stage.
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return float(value[0])


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_batch(tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
    """A causal-LM micro-batch from `[b, s+1]` token ids: inputs, shifted labels, full mask."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    b, s = inputs.shape
    return {
        "tokens": inputs,
        "labels": labels,
        "loss_mask": torch.ones(b, s, dtype=torch.float32),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
    }
