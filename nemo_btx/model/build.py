"""Dense and MoE Llama-style GPTModels from the config, on CPU (local spec) or GPU (TE spec).

The dense seed, the domain experts, the merged BTX MoE and the upcycling baseline are all built
here, from one `ModelConfig`: that is what lets a dense expert's FFN tensors map one-to-one onto
an MoE expert's in the mix stage.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.config.validate import etp_of, sequence_parallel_of
from nemo_btx.errors import ConfigError
# The counting rules live in the planner (no torch there); re-exported for the model's users.
from nemo_btx.planner.flops import model_flops_per_token  # noqa: F401
from nemo_btx.planner.params import padded_vocab_size

log = logging.getLogger(__name__)


def have_transformer_engine() -> bool:
    """TE is optional (the `gpu` extra) and only useful with CUDA."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises OSError/ImportError variants when its CUDA libs are missing
        return False
    return True


def params_dtype(cfg: ExperimentConfig) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless the config says otherwise."""
    if cfg.train.precision == "bf16":
        return torch.bfloat16
    if cfg.train.precision == "fp32":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def transformer_config(cfg: ExperimentConfig, shapes_only: bool = False):
    """megatron-core TransformerConfig for this experiment's model and layout (`shapes_only`:
    for a model that only describes tensors, see `build_model`)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p, moe = cfg.model, cfg.parallel, cfg.model.moe
    dtype = params_dtype(cfg)
    # A shapes-only model is configured as on CPU wherever it is built: nothing of it runs.
    on_gpu = torch.cuda.is_available() and not shapes_only
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vp if p.vp and p.vp > 1 else None,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=etp_of(p),
        sequence_parallel=sequence_parallel_of(cfg),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # CPU: draw weights on the CPU generator, which makes init independent of the layout's
        # CUDA RNG trackers; the fused kernels below exist only as CUDA/TE implementations.
        use_cpu_initialization=not on_gpu,
        perform_initialization=not shapes_only,
        bias_activation_fusion=on_gpu and m.activation == "swiglu",
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_comm=p.batch_p2p_comm,
        deallocate_pipeline_outputs=on_gpu,
    )
    if p.recompute != "none":
        # selective: megatron-core's default recompute_modules, ["core_attn"]; full: every layer
        # from its input, one layer per checkpoint.
        kwargs.update(recompute_granularity=p.recompute)
        if p.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    if moe.num_experts is not None:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_ffn_hidden_size=m.ffn_hidden_size,
            moe_router_topk=moe.router_topk,
            moe_aux_loss_coeff=moe.aux_loss_coeff if moe.load_balancing_type != "none" else 0.0,
            moe_router_load_balancing_type=moe.load_balancing_type,
            moe_token_dispatcher_type=moe.token_dispatcher_type,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_router_pre_softmax=moe.router_pre_softmax,
            moe_grouped_gemm=moe.grouped_gemm and spec_name(cfg, shapes_only) == "transformer_engine",
            moe_router_dtype="fp32",
        )
    tconfig = TransformerConfig(**kwargs)
    if not on_gpu:
        # gloo silently corrupts batched p2p with interleaved PP (runtime/cpu.py says why).
        from nemo_btx.runtime.cpu import force_batch_p2p_comm_off

        force_batch_p2p_comm_off(tconfig, user_requested=bool(p.vp and p.vp > 1 and p.pp > 1))
    return tconfig


#: What the last model built in this process runs on (written into checkpoint markers).
KERNELS: dict = {}


def spec_name(cfg: ExperimentConfig, shapes_only: bool = False) -> str:
    """`transformer_engine` on a CUDA machine, `local` (megatron-core's own layers) on CPU and for
    shapes-only models. A CUDA machine without Transformer Engine is an error unless
    model.allow_local_spec: the local layers run unfused attention and no grouped GEMM, so a run
    would silently be several times slower than its config says."""
    if shapes_only or not torch.cuda.is_available():
        return "local"
    if have_transformer_engine():
        return "transformer_engine"
    if not cfg.model.allow_local_spec:
        raise ConfigError("model.allow_local_spec", False,
                          "this machine has CUDA but Transformer Engine does not import: install the "
                          "`gpu` extra or use an NGC PyTorch container, or set model.allow_local_spec=true "
                          "to train with megatron-core's local layers (unfused attention, no grouped GEMM)")
    log.warning("model: CUDA without Transformer Engine: megatron-core's local layers "
                "(model.allow_local_spec=true; unfused attention, no grouped GEMM)")
    return "local"


def layer_spec(cfg: ExperimentConfig, shapes_only: bool = False):
    """Transformer Engine layers on GPU, megatron-core's local layers otherwise (`spec_name`;
    for a shapes-only model too: TE allocates on the GPU whatever the default device, and the
    local spec's sharded_state_dict_keys_map gives its checkpoints TE's tensor names)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    moe = cfg.model.moe
    name = spec_name(cfg, shapes_only)
    if name == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=moe.num_experts, moe_grouped_gemm=moe.grouped_gemm,
            qk_layernorm=cfg.model.qk_layernorm)
    return get_gpt_layer_local_spec(
        num_experts=moe.num_experts, moe_grouped_gemm=False, qk_layernorm=cfg.model.qk_layernorm,
        normalization=cfg.model.normalization)


def build_model(cfg: ExperimentConfig, *, wrap_ddp: bool = True,
                frozen: Optional[Callable[[str], bool]] = None,
                shapes_only: bool = False) -> List[torch.nn.Module]:
    """One GPTModel chunk per virtual pipeline stage of this rank (a list of 1 without VP).

    Call after `runtime.init_runtime`. With `wrap_ddp`, chunks come wrapped in megatron's
    DistributedDataParallel, which owns the contiguous grad buffers the optimizer needs.
    `frozen(name)` marks parameters that must not train; it runs before DDP so frozen
    parameters get no gradient buffer and the optimizer never sees them.

    `shapes_only`: a model whose tensors are all on the meta device (no memory, no init), for
    what needs only names, shapes and shardings (mix, upcycle, import-hf). The same decision on
    CPU and GPU: CPU-style initialisation (megatron otherwise allocates on the current CUDA
    device whatever the default device is), no initialisation, the local layer spec, no move
    to a device (a meta tensor cannot be copied).
    """
    if shapes_only:
        with torch.device("meta"):
            return _build(cfg, wrap_ddp=False, frozen=frozen, shapes_only=True)
    return _build(cfg, wrap_ddp=wrap_ddp, frozen=frozen, shapes_only=False)


def _build(cfg: ExperimentConfig, *, wrap_ddp: bool, frozen, shapes_only: bool) -> List[torch.nn.Module]:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tconfig = transformer_config(cfg, shapes_only)
    spec = layer_spec(cfg, shapes_only)
    if not shapes_only:
        KERNELS.clear()
        KERNELS.update(
            spec=spec_name(cfg), grouped_gemm=bool(tconfig.moe_grouped_gemm),
            fused=[k for k in ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
                               "apply_rope_fusion", "gradient_accumulation_fusion") if getattr(tconfig, k)],
            recompute=tconfig.recompute_granularity)
        log.info("model: %s layers, fused %s, grouped GEMM %s, recompute %s", KERNELS["spec"],
                 ", ".join(KERNELS["fused"]) or "nothing", KERNELS["grouped_gemm"], KERNELS["recompute"])
    vp = tconfig.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        model = GPTModel(
            config=tconfig,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(cfg.model, cfg.parallel.tp),
            max_sequence_length=cfg.model.max_position_embeddings or cfg.model.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
            position_embedding_type=cfg.model.position_embedding_type,
            rotary_base=cfg.model.rotary_base,
            **rope_scaling_kwargs(cfg.model),
            vp_stage=stage,
        )
        if model.post_process and padded_vocab_size(cfg.model, cfg.parallel.tp) > cfg.model.vocab_size:
            _exclude_padding_from_loss(model, cfg.model.vocab_size)
        if torch.cuda.is_available() and not shapes_only:
            model.cuda(torch.cuda.current_device())
        if tconfig.bf16:
            # Casts first-stage inputs to bf16 and last-stage outputs back to fp32; the
            # optimizer keeps fp32 main weights (megatron's mixed-precision recipe).
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(tconfig, model)
        if frozen is not None:
            for name, param in model.named_parameters():
                if frozen(name):
                    param.requires_grad_(False)
        chunks.append(model)
    if wrap_ddp:
        chunks = wrap_in_ddp(cfg, chunks)
    return chunks


def _exclude_padding_from_loss(model: torch.nn.Module, vocab_size: int) -> None:
    """Megatron's cross entropy runs over the padded vocabulary, so the padding rows' logits
    enter every softmax. Their number grows with TP (vocab 300: 84 rows at TP=1, 212 at TP=2)
    and an imported model's are zeros, so the loss would depend on the layout and differ from
    the unpadded model's (transformers'). Masked to -inf here, the loss is the one over the
    real vocabulary at every layout; the padding rows then get no gradient and stay as they
    are. Evaluation slices the logits to the vocabulary the same way."""
    from megatron.core import parallel_state

    loss = model.compute_language_model_loss

    def masked(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        local = logits.shape[-1]  # this TP rank's slice of the padded vocabulary
        first = parallel_state.get_tensor_model_parallel_rank() * local
        if first + local > vocab_size:
            padding = torch.arange(first, first + local, device=logits.device) >= vocab_size
            logits = logits.masked_fill(padding, float("-inf"))
        return loss(labels, logits)

    model.compute_language_model_loss = masked


def rope_scaling_kwargs(m) -> dict:
    """GPTModel's arguments for model.rope_scaling (megatron-core computes both kinds)."""
    if m.rope_scaling == "llama3":
        return dict(rope_scaling=True, rope_scaling_factor=m.rope_scaling_factor)
    if m.rope_scaling == "linear":
        return dict(seq_len_interpolation_factor=m.rope_scaling_factor)
    return {}


def overlap_grad_reduce(cfg: ExperimentConfig) -> bool:
    p = cfg.parallel
    if p.overlap_grad_reduce is not None:
        return p.overlap_grad_reduce
    return torch.cuda.is_available() and p.distributed_optimizer


def overlap_param_gather(cfg: ExperimentConfig) -> bool:
    p = cfg.parallel
    if p.overlap_param_gather is not None:
        return p.overlap_param_gather
    return torch.cuda.is_available() and p.distributed_optimizer


def wrap_in_ddp(cfg: ExperimentConfig, chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce(cfg),
        overlap_param_gather=overlap_param_gather(cfg),
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk may skip the bucket that overlaps with the optimizer.
            disable_bucketing=i > 0,
        ))
    return wrapped


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP (and Float16Module) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def count_parameters(chunks: List[torch.nn.Module]) -> int:
    """Parameters held by this rank (a shard of the model under TP/PP/EP)."""
    return sum(p.numel() for c in chunks for p in unwrap(c).parameters())


def is_moe(cfg: ExperimentConfig) -> bool:
    return cfg.model.moe.num_experts is not None
