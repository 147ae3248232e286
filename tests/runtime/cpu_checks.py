"""Helper script for tests/runtime/test_cpu.py: megatron-core operations on CPU/gloo.

Two modes:

* ``python cpu_checks.py single OUT.json``: one process imports megatron-core once, then forks
  one child per job.  A "necessity" job sets ``NEMO_BTX_CPU_SKIP=<name>``, applies the CPU
  redirections and runs the megatron-core operation that needs <name> (expected to fail with a
  known error); the "all" job applies everything and runs every single-process operation plus
  the correctness checks.  Results (errors with their traceback frames) go to OUT.json.
* ``torchrun --nproc_per_node 2 cpu_checks.py dist CHECK[,CHECK...] OUT_DIR``: each rank
  applies the redirections (honouring ``NEMO_BTX_CPU_SKIP``), runs the named 2-process checks
  and writes ``OUT_DIR/<check>.rank<r>.json`` per check.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1)

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402

from nemo_btx.runtime import cpu  # noqa: E402

SEED = 1234
VOCAB, SEQ, MBS, HIDDEN = 128, 32, 2, 64


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


def make_config(*, moe=True, num_layers=2, tp=1, pp=1, vp=None, ep=1, etp=None, sp=False, **kw):
    moe_kw = {}
    if moe:
        moe_kw = dict(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_aux_loss_coeff=0.01,
            moe_router_load_balancing_type="aux_loss",
            moe_token_dispatcher_type="alltoall",
            moe_ffn_hidden_size=96,
        )
    params = dict(
        num_layers=num_layers,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=128,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=sp,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    params.update(moe_kw)
    params.update(kw)
    return TransformerConfig(**params)


def build_gpt(config, *, vp_stage=None):
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    if config.virtual_pipeline_model_parallel_size:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    else:
        pre = parallel_state.is_pipeline_first_stage()
        post = parallel_state.is_pipeline_last_stage()
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        vp_stage=vp_stage,
    )


def init_single_process():
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )


def init_parallel(tp=1, pp=1, vp=None, ep=1, etp=None, seed=SEED):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # megatron-core quirk (not CPU-specific): a backward outside the schedules leaves a 0-dim
    # aux-loss scale that the schedules' 1-element scale cannot be copied into.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def make_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        batches.append(
            dict(
                tokens=tokens[:, :-1].contiguous(),
                labels=tokens[:, 1:].contiguous(),
                position_ids=torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ).contiguous(),
            )
        )
    return batches


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def fwd_bwd(model_chunks, batches, *, forward_only=False):
    """Run megatron's forward_backward_func; returns the per-microbatch losses (last stage)."""
    fb = get_forward_backward_func()
    if len(model_chunks) > 1:
        data = [iter(list(batches)) for _ in model_chunks]
        model = model_chunks
    else:
        data = iter(list(batches))
        model = model_chunks[0]
    out = fb(
        forward_step_func=forward_step,
        data_iterator=data,
        model=model,
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=forward_only,
    )
    return [float(d["loss"]) for d in out]


def wrap_ddp(config, model, *, distopt=False):
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=distopt,
        ),
        module=model,
    )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def _unwrap(chunk):
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _grad(p):
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def reference_name(chunk, name, *, ep_rank, num_local_experts):
    layer_map = {i: layer.layer_number - 1 for i, layer in enumerate(_unwrap(chunk).decoder.layers)}
    name = re.sub(r"^module\.", "", name)
    name = re.sub(
        r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{layer_map[int(m[1])]}.", name
    )
    return re.sub(
        r"local_experts\.(\d+)\.",
        lambda m: f"local_experts.{ep_rank * num_local_experts + int(m[1])}.",
        name,
    )


def shard_of(full, local, name, *, glu=True):
    """The part of a TP=1 tensor that this rank holds in its TP/expert-TP sharded layout."""
    if full.shape == local.shape:
        return full
    expert = "local_experts" in name
    size = (
        parallel_state.get_expert_tensor_parallel_world_size()
        if expert
        else parallel_state.get_tensor_model_parallel_world_size()
    )
    rank = (
        parallel_state.get_expert_tensor_parallel_rank()
        if expert
        else parallel_state.get_tensor_model_parallel_rank()
    )
    dim = [d for d in range(full.dim()) if full.shape[d] != local.shape[d]]
    assert len(dim) == 1 and full.shape[dim[0]] == local.shape[dim[0]] * size, (name, full.shape, local.shape)
    dim = dim[0]
    if glu and name.endswith("linear_fc1.weight"):
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]], 0)
    return torch.chunk(full, size, dim=dim)[rank]


def load_reference(chunks, ref_params, config):
    """Copy the TP1/EP1/PP1 reference weights into this rank's (sharded) model chunks."""
    nle = (config.num_moe_experts or 0) // parallel_state.get_expert_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                ref = ref_params[reference_name(chunk, name, ep_rank=ep_rank, num_local_experts=nle)]
                p.copy_(shard_of(ref, p, name))


def compare_grads(chunks, ref_grads, config, *, rtol=1e-4, atol=1e-6):
    """Max relative error of each local grad vs the reference grad; returns (worst, per-name)."""
    nle = (config.num_moe_experts or 0) // parallel_state.get_expert_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    errors = {}
    for chunk in chunks:
        for name, p in _unwrap(chunk).named_parameters():
            rname = reference_name(chunk, name, ep_rank=ep_rank, num_local_experts=nle)
            ref = shard_of(ref_grads[rname], p, name)
            got = _grad(p)
            scale = ref.abs().max().item() + atol
            errors[rname] = (got.float() - ref.float()).abs().max().item() / scale
    return max(errors.values()), errors


def reference_run(config_kwargs, batches):
    """TP1/PP1/EP1 model: parameters, grads and per-microbatch losses (no DDP)."""
    init_parallel()
    config = make_config(**config_kwargs)
    model = build_gpt(config)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = fwd_bwd([model], batches)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return params, grads, losses


def _error_record(exc):
    frames = [(f.filename, f.name) for f in traceback.extract_tb(exc.__traceback__)]
    return {
        "ok": False,
        "error_type": type(exc).__name__,
        "error": str(exc)[:2000],
        "frames": frames,
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
    }


def run_one(fn):
    t0 = time.perf_counter()
    try:
        data = fn()
        rec = {"ok": True, "data": data}
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        rec = _error_record(exc)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


# ------------------------------------------------------------------------------------------
# Single-process operations: the megatron-core call that needs each redirection.
# ------------------------------------------------------------------------------------------


def op_current_device():
    """Dense GPT forward: RotaryEmbedding moves inv_freq to torch.cuda.current_device()."""
    init_parallel()
    model = build_gpt(make_config(moe=False))
    b = make_batches(1, 7)[0]
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    rot = model.rotary_pos_emb.inv_freq
    return {"loss": float(out.mean()), "inv_freq_device": str(rot.device)}


def op_rng_state():
    """model_parallel_cuda_manual_seed (reads the CUDA RNG state)."""
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    return {}


def op_streams_events():
    """Building a MoE GPT with the alltoall dispatcher (creates a torch.cuda.Stream)."""
    init_parallel()
    model = build_gpt(make_config(moe=True))
    return {"stream": type(model.decoder.layers[0].mlp.token_dispatcher.cuda_dtoh_stream).__name__}


def op_te_general_gemm():
    """MoE GPT forward + backward (router gating -> RouterGatingLinearFunction)."""
    init_parallel()
    model = build_gpt(make_config(moe=True))
    b = make_batches(1, 7)[0]
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    out.mean().backward()
    return {"loss": float(out.mean())}


def op_cuda_factories():
    """get_forward_backward_func at PP=1 (schedules allocate total_num_tokens on 'cuda')."""
    init_parallel()
    model = build_gpt(make_config(moe=False))
    return {"losses": fwd_bwd([model], make_batches(2, 7))}


def op_torch_norm_sequence_parallel():
    """WrappedTorchNorm (the local spec's norm) with sequence_parallel=True (MoE at TP>1)."""
    config = make_config(moe=True, tp=2, sp=True)
    norm = WrappedTorchNorm(config, HIDDEN, eps=config.layernorm_epsilon)
    return {
        "type": type(norm).__name__,
        "marked": [bool(getattr(p, "sequence_parallel", False)) for p in norm.parameters()],
        "config_sp_unchanged": config.sequence_parallel,
    }


def _optimizer_config(**kw):
    params = dict(optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=1.0, bf16=False)
    params.update(kw)
    return OptimizerConfig(**params)


def _train_steps(config, ddp, opt, batches_per_step):
    losses = []
    for batches in batches_per_step:
        opt.zero_grad()
        ddp.zero_grad_buffer()
        losses.append(fwd_bwd([ddp], batches))
        ok, grad_norm, _ = opt.step()
        assert ok
    return losses, float(grad_norm)


def op_distributed_optimizer_param_type():
    """megatron optimizers on CPU params: DistributedOptimizer, plain fp32 (grad clipping), bf16."""
    results = {}
    init_parallel()
    batches = make_batches(2, 11)

    def distopt():
        config = make_config(moe=False)
        ddp = wrap_ddp(config, build_gpt(config), distopt=True)
        opt = get_megatron_optimizer(_optimizer_config(use_distributed_optimizer=True), [ddp])
        return _train_steps(config, ddp, opt, [batches])

    def plain_clipped():
        config = make_config(moe=False)
        ddp = wrap_ddp(config, build_gpt(config))
        opt = get_megatron_optimizer(_optimizer_config(), [ddp])
        return _train_steps(config, ddp, opt, [batches])

    def bf16():
        config = make_config(moe=False, bf16=True, params_dtype=torch.bfloat16)
        ddp = wrap_ddp(config, build_gpt(config))
        opt = get_megatron_optimizer(_optimizer_config(bf16=True), [ddp])
        return {"optimizer": type(opt).__name__}

    for key, fn in (("distopt", distopt), ("plain_clipped", plain_clipped), ("bf16", bf16)):
        results[key] = run_one(fn)
    return {"subops": results}


SINGLE_OPS = {
    "current_device": op_current_device,
    "rng_state": op_rng_state,
    "streams_events": op_streams_events,
    "te_general_gemm": op_te_general_gemm,
    "cuda_factories": op_cuda_factories,
    "torch_norm_sequence_parallel": op_torch_norm_sequence_parallel,
    "distributed_optimizer_param_type": op_distributed_optimizer_param_type,
}


# ------------------------------------------------------------------------------------------
# Single-process correctness checks (all redirections applied)
# ------------------------------------------------------------------------------------------


def check_rng_semantics():
    """Tracker forks draw from reproducible, correctly seeded streams; default stream untouched."""
    import logging

    records = []

    class Catch(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Catch()
    logging.getLogger("megatron.core.tensor_parallel.random").addHandler(handler)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    ep_name = tensor_parallel.get_expert_parallel_rng_tracker_name()

    def draws():
        tensor_parallel.model_parallel_cuda_manual_seed(SEED)
        default_0 = torch.rand(4)
        with tracker.fork():
            mp_a = torch.rand(4)
        default_1 = torch.rand(4)
        with tracker.fork():
            mp_b = torch.rand(4)
        with tracker.fork(ep_name):
            ep_a = torch.rand(4)
        return default_0, mp_a, default_1, mp_b, ep_a

    first, second = draws(), draws()
    plain = torch.Generator().manual_seed(SEED)
    plain_default = torch.rand(8, generator=plain)
    mp_gen = torch.Generator().manual_seed(SEED + 2718)  # tp_rank 0
    ep_gen = torch.Generator().manual_seed(SEED + 1024)  # ep_rank 0, etp_rank 0
    default_0, mp_a, default_1, mp_b, ep_a = first
    logging.getLogger("megatron.core.tensor_parallel.random").removeHandler(handler)
    return {
        "reproducible": all(torch.equal(a, b) for a, b in zip(first, second)),
        "default_stream_untouched_by_forks": torch.equal(torch.cat([default_0, default_1]), plain_default),
        "model_parallel_stream_seeded": torch.equal(torch.cat([mp_a, mp_b]), torch.rand(8, generator=mp_gen)),
        "expert_parallel_stream_seeded": torch.equal(ep_a, torch.rand(4, generator=ep_gen)),
        "forks_differ_from_default": not torch.equal(mp_a, default_0),
        "warnings": records,
    }


def check_streams_events():
    s = torch.cuda.Stream()
    e = torch.cuda.Event()
    t = torch.ones(3)
    with torch.cuda.stream(s):
        s.wait_stream(torch.cuda.current_stream())
        t.record_stream(torch.cuda.current_stream())
        ev = s.record_event()
    ev.synchronize()
    e.record()
    torch.cuda.synchronize()
    return {"ok": True}


def check_te_general_gemm():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    out = router_gating_linear(x, w, None, torch.float32)
    out.sum().backward()
    return {
        "value": torch.allclose(out, x @ w.t()),
        "grad_x": torch.allclose(x.grad, torch.ones(5, 4) @ w),
        "grad_w": torch.allclose(w.grad, torch.ones(5, 4).t() @ x),
    }


def check_cuda_factories():
    """Schedule losses equal a direct forward; proxy cost vs plain torch."""
    import timeit

    from megatron.core.pipeline_parallel import schedules

    init_parallel()
    model = build_gpt(make_config(moe=False))
    batches = make_batches(2, 7)
    with torch.no_grad():
        direct = [
            float(model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float().mean())
            for b in batches
        ]
    scheduled = fwd_bwd([model], batches, forward_only=True)
    # How many proxied factory calls does a training step make?
    counts = {"n": 0}
    saved = []
    for mod_name in cpu.CUDA_FACTORY_MODULES:
        proxy_mod = sys.modules[mod_name].torch
        for fname in cpu._FACTORY_NAMES:
            fn = proxy_mod.__dict__[fname]

            def counted(*a, _fn=fn, **k):
                counts["n"] += 1
                return _fn(*a, **k)

            saved.append((proxy_mod, fname, fn))
            proxy_mod.__dict__[fname] = counted
    t0 = time.perf_counter()
    fwd_bwd([model], batches)
    step_s = time.perf_counter() - t0
    for proxy_mod, fname, fn in saved:
        proxy_mod.__dict__[fname] = fn
    proxy = schedules.torch
    n = 20000
    t_proxy = min(timeit.repeat(lambda: proxy.zeros([], dtype=torch.int, device="cuda"), number=n, repeat=5)) / n
    t_real = min(timeit.repeat(lambda: torch.zeros([], dtype=torch.int, device="cpu"), number=n, repeat=5)) / n
    t_attr_proxy = min(timeit.repeat(lambda: proxy.float32, number=n, repeat=5)) / n
    t_attr_real = min(timeit.repeat(lambda: torch.float32, number=n, repeat=5)) / n
    return {
        "direct": direct,
        "scheduled": scheduled,
        "zeros_device": str(proxy.zeros(1, device="cuda").device),
        "factory_us_proxy": t_proxy * 1e6,
        "factory_us_real": t_real * 1e6,
        "attr_ns_proxy": t_attr_proxy * 1e9,
        "attr_ns_real": t_attr_real * 1e9,
        "global_torch_untouched": torch.zeros.__module__ != "nemo_btx.runtime.cpu",
        "proxied_factory_calls_per_step": counts["n"],
        "step_seconds": step_s,
        "proxy_is_plain_module": type(proxy) is type(torch),
    }


def check_distributed_optimizer_single():
    """DP=1: DistributedOptimizer steps give the same params as the plain megatron optimizer."""
    init_parallel()
    batches = make_batches(2, 11)
    results = {}
    for distopt in (False, True):
        init_parallel()
        config = make_config(moe=True)
        ddp = wrap_ddp(config, build_gpt(config), distopt=distopt)
        opt = get_megatron_optimizer(_optimizer_config(use_distributed_optimizer=distopt), [ddp])
        losses, gn = _train_steps(config, ddp, opt, [batches, batches])
        results[distopt] = (losses, {n: p.detach().clone() for n, p in ddp.module.named_parameters()}, type(opt).__name__)
    max_diff = max(
        (results[True][1][n] - results[False][1][n]).abs().max().item() for n in results[False][1]
    )
    return {
        "losses_plain": results[False][0],
        "losses_distopt": results[True][0],
        "max_param_diff": max_diff,
        "optimizer_types": [results[False][2], results[True][2]],
    }


def check_idempotent():
    """A second and third apply change nothing: same list, same patched objects, no re-wrapping."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import mappings, random as mrandom
    from megatron.core.transformer.torch_norm import WrappedTorchNorm as norm_cls

    def snapshot():
        return [
            torch.cuda.current_device, torch.cuda.Stream, torch.Tensor.record_stream,
            mrandom._get_cuda_rng_state, mrandom.torch, schedules.torch,
            schedules.torch.zeros, mappings._AllToAll.__dict__["forward"],
            mappings._gather_along_first_dim,
            norm_cls.__dict__["__new__"],
        ]

    before = snapshot()
    first = cpu.apply_cpu_redirections()
    second = cpu.apply_cpu_redirections()
    after = snapshot()
    inner = mappings._AllToAll.__dict__["forward"].__func__.__wrapped__
    return {
        "lists": [first, second],
        "same_objects": all(a is b for a, b in zip(before, after)),
        "alltoall_wrapped_once": not getattr(inner, "__nemo_btx_cpu__", False),
        "current_device": str(torch.cuda.current_device()),
    }


SINGLE_CHECKS = {
    "idempotent": check_idempotent,
    "rng_semantics": check_rng_semantics,
    "streams_events": check_streams_events,
    "te_general_gemm": check_te_general_gemm,
    "cuda_factories": check_cuda_factories,
    "distributed_optimizer_single": check_distributed_optimizer_single,
}


def _child(conn, skip):
    try:
        if skip is not None:
            os.environ[cpu.SKIP_ENV_VAR] = skip
        else:
            os.environ.pop(cpu.SKIP_ENV_VAR, None)
        applied = cpu.apply_cpu_redirections()
        init_single_process()
        result = {"applied": applied}
        if skip is not None:
            if skip == "rng_state":
                parallel_state.initialize_model_parallel()
            result["op"] = run_one(SINGLE_OPS[skip])
            # Now apply the missing one in the same process: the same operation must succeed.
            os.environ.pop(cpu.SKIP_ENV_VAR)
            result["late_applied"] = cpu.apply_cpu_redirections()
            result["op_after"] = run_one(SINGLE_OPS[skip])
        else:
            result["ops"] = {name: run_one(fn) for name, fn in SINGLE_OPS.items()}
            result["checks"] = {name: run_one(fn) for name, fn in SINGLE_CHECKS.items()}
        conn.send(result)
    except BaseException as exc:  # noqa: BLE001
        conn.send({"fatal": _error_record(exc)})
    finally:
        conn.close()
        os._exit(0)


def main_single(out_path, timeout=120):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    jobs = [("skip", name) for name in SINGLE_OPS] + [("all", None)]
    results = {}
    running = []
    pending = list(jobs)
    deadline = time.monotonic() + timeout
    while pending or running:
        while pending and len(running) < 2:  # two cores
            kind, name = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(child, name))
            proc.start()
            child.close()
            running.append((kind, name, proc, parent))
        for item in list(running):
            kind, name, proc, parent = item
            key = f"{kind}:{name}" if name else kind
            if parent.poll(0.05):
                try:
                    results[key] = parent.recv()
                except EOFError:
                    results[key] = {"fatal": {"error": "child died without result"}}
                proc.join(5)
                running.remove(item)
            elif not proc.is_alive():
                results[key] = {"fatal": {"error": f"child exited {proc.exitcode} without result"}}
                running.remove(item)
            elif time.monotonic() > deadline:
                proc.kill()
                results[key] = {"fatal": {"error": "timeout"}}
                running.remove(item)
    Path(out_path).write_text(json.dumps(results, default=str))


# ------------------------------------------------------------------------------------------
# Two-process checks (torchrun --nproc_per_node 2)
# ------------------------------------------------------------------------------------------


def dist_ep2():
    """MoE, EP=2 (alltoall dispatcher, DP=2 for dense params) vs single-process reference."""
    rank = torch.distributed.get_rank()
    per_rank = [make_batches(1, 100 + r)[0] for r in range(2)]
    ref_params, ref_grads, ref_losses = reference_run({}, per_rank)
    init_parallel(ep=2)
    config = make_config(ep=2)
    model = build_gpt(config)
    load_reference([model], ref_params, config)
    ddp = wrap_ddp(config, model)
    ddp.zero_grad_buffer()
    losses = fwd_bwd([ddp], [per_rank[rank]])
    worst, errors = compare_grads([ddp], ref_grads, config)
    return {"loss": losses[0], "ref_loss": ref_losses[rank], "worst_grad_rel_err": worst,
            "n_params": len(errors)}


def dist_tp2():
    """MoE, TP=2 + sequence parallel, expert TP=2 (uneven gathers) vs single-process reference."""
    batch = make_batches(1, 200)
    ref_params, ref_grads, ref_losses = reference_run({}, batch)
    init_parallel(tp=2, etp=2)
    config = make_config(tp=2, etp=2, sp=True)
    model = build_gpt(config)
    load_reference([model], ref_params, config)
    ddp = wrap_ddp(config, model)
    ddp.zero_grad_buffer()
    losses = fwd_bwd([ddp], batch)
    worst, errors = compare_grads([ddp], ref_grads, config)
    norm_errors = {n: e for n, e in errors.items() if "layernorm" in n or "final_layernorm" in n}
    marked = [
        n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)
    ]
    return {"loss": losses[0], "ref_loss": ref_losses[0], "worst_grad_rel_err": worst,
            "norm_errors": norm_errors, "n_norm_params_marked": len(marked)}


def dist_distopt():
    """DP=2 MoE: DistributedOptimizer steps == plain megatron optimizer steps."""
    rank = torch.distributed.get_rank()
    steps = [make_batches(1, 300 + 10 * s + rank) for s in range(2)]
    results = {}
    for distopt in (False, True):
        init_parallel()
        config = make_config()
        ddp = wrap_ddp(config, build_gpt(config), distopt=distopt)
        opt = get_megatron_optimizer(_optimizer_config(use_distributed_optimizer=distopt), [ddp])
        losses, gn = _train_steps(config, ddp, opt, steps)
        results[distopt] = (losses, {n: p.detach().clone() for n, p in ddp.module.named_parameters()}, gn, type(opt).__name__)
    max_diff = max((results[True][1][n] - results[False][1][n]).abs().max().item() for n in results[False][1])
    # Both ranks must hold the same (all-gathered) parameters.
    flat = torch.cat([p.flatten() for p in results[True][1].values()])
    other = flat.clone()
    torch.distributed.broadcast(other, src=0)
    moved = max((results[True][1][n] - p0).abs().max().item()
                for n, p0 in _initial_params().items())
    return {"losses_plain": results[False][0], "losses_distopt": results[True][0],
            "grad_norms": [results[False][2], results[True][2]], "max_param_diff": max_diff,
            "ranks_agree": bool(torch.equal(flat, other)), "params_moved": moved,
            "optimizer_types": [results[False][3], results[True][3]]}


def _initial_params():
    init_parallel()
    return {n: p.detach().clone() for n, p in build_gpt(make_config()).named_parameters()}


def dist_vpp():
    """PP=2 x VP=2 interleaved, dense 4 layers: batch_p2p_comm True vs False vs reference."""
    batches = make_batches(4, 400)
    ref_params, ref_grads, ref_losses = reference_run({"moe": False, "num_layers": 4}, batches)
    init_parallel(pp=2, vp=2)
    config = make_config(moe=False, num_layers=4, pp=2, vp=2)
    chunks = [build_gpt(config, vp_stage=i) for i in range(2)]
    load_reference(chunks, ref_params, config)
    out = {"ref_losses": ref_losses}
    config.batch_p2p_comm = True
    out["batch_True_forward_only"] = {"losses": fwd_bwd(chunks, batches, forward_only=True)}
    for batch_p2p in (True, False):
        config.batch_p2p_comm = batch_p2p
        for c in chunks:
            c.zero_grad(set_to_none=True)
        losses = fwd_bwd(chunks, batches)
        worst, _ = compare_grads(chunks, ref_grads, config)
        out[f"batch_{batch_p2p}"] = {"losses": losses, "worst_grad_rel_err": worst}
    return out


def dist_moe_forward_ep2():
    """Necessity op: MoE forward/backward at EP=2 (alltoall with split sizes)."""
    init_parallel(ep=2)
    model = build_gpt(make_config(ep=2))
    b = make_batches(1, 500 + torch.distributed.get_rank())[0]
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    out.mean().backward()
    return {"loss": float(out.mean())}


def dist_moe_forward_etp2():
    """Necessity op: MoE forward/backward at TP=2, expert TP=2 with token dropping.

    The expert-TP ranks then route different numbers of tokens, so the alltoall dispatcher's
    gather/reduce-scatter across expert-TP is uneven (with 2 processes this is the way to get
    there; dropless routing at EP=1 gives every TP rank tokens*topk)."""
    init_parallel(tp=2, etp=2)
    model = build_gpt(make_config(tp=2, etp=2, sp=True, moe_expert_capacity_factor=1.0))
    b = make_batches(1, 600)[0]
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    out.mean().backward()
    return {"loss": float(out.mean())}


def dist_uneven_collectives():
    """megatron's uneven gather / reduce-scatter over a 2-rank gloo group (values and grads)."""
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    init_parallel(tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = group.rank()
    sizes = [3, 5]
    start = sum(sizes[:rank])

    def ramp(rows, scale=1.0, offset=0.0):
        return torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4) * scale + offset

    def gather():
        x = ramp(sizes[rank], offset=100 * rank).requires_grad_(True)
        gathered = gather_from_sequence_parallel_region(x, group=group, output_split_sizes=sizes)
        expected = torch.cat([ramp(s, offset=100 * r) for r, s in enumerate(sizes)])
        (gathered * ramp(sum(sizes), scale=rank + 1)).sum().backward()
        # grad of sum_r <gathered, w_r> w.r.t. this rank's piece: its rows of sum_r w_r.
        expected_grad = ramp(sum(sizes), scale=3)[start : start + sizes[rank]]
        return {"values": bool(torch.equal(gathered.detach(), expected)),
                "grad": bool(torch.equal(x.grad, expected_grad))}

    def reduce_scatter():
        y = ramp(sum(sizes), scale=rank + 1)
        out = reduce_scatter_to_sequence_parallel_region(y, group=group, input_split_sizes=sizes)
        expected = ramp(sum(sizes), scale=3)[start : start + sizes[rank]]
        return {"values": bool(torch.equal(out, expected)), "shape": list(out.shape)}

    return {"subops": {"gather": run_one(gather), "reduce_scatter": run_one(reduce_scatter)}}


def dist_tp2ep2():
    """4 processes: MoE at TP=2 (sequence parallel), EP=2, expert TP=2, DP=2 vs reference.

    The realistic layout in which the alltoall dispatcher's expert-TP gathers are uneven."""
    dp_rank_of = {0: 0, 1: 0, 2: 1, 3: 1}  # megatron's default order tp-cp-ep-dp-pp
    per_dp = [make_batches(1, 700 + d)[0] for d in range(2)]
    ref_params, ref_grads, ref_losses = reference_run({}, per_dp)
    init_parallel(tp=2, ep=2, etp=2)
    dp_rank = parallel_state.get_data_parallel_rank()
    config = make_config(tp=2, ep=2, etp=2, sp=True)
    model = build_gpt(config)
    load_reference([model], ref_params, config)
    ddp = wrap_ddp(config, model)
    ddp.zero_grad_buffer()
    losses = fwd_bwd([ddp], [per_dp[dp_rank]])
    worst, errors = compare_grads([ddp], ref_grads, config)
    return {"loss": losses[0], "ref_loss": ref_losses[dp_rank], "worst_grad_rel_err": worst,
            "dp_rank": dp_rank, "expected_dp_rank": dp_rank_of[torch.distributed.get_rank()]}


def dist_ckpt_fully_parallel():
    """torch_dist save (fully parallel) + loads: plain and with each exchange algorithm."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
        FullyParallelSaveStrategyWrapper,
    )

    ckpt_dir = Path(OUT_DIR, "ckpt")
    if torch.distributed.get_rank() == 0:
        ckpt_dir.mkdir()
    torch.distributed.barrier()
    init_parallel()
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    saved_model = build_gpt(make_config())
    t0 = time.perf_counter()
    save = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), dp_group)
    dist_checkpointing.save(saved_model.sharded_state_dict(), str(ckpt_dir), sharded_strategy=save)
    save_s = time.perf_counter() - t0
    results = {}
    def load(algo):
        init_parallel(seed=SEED + 1)
        model = build_gpt(make_config())
        strategy = None
        if algo != "plain":
            strategy = FullyParallelLoadStrategyWrapper(
                get_default_load_sharded_strategy(str(ckpt_dir)),
                parallel_state.get_data_parallel_group(with_context_parallel=True),
                exchange_algo=algo,
            )
        state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir), sharded_strategy=strategy)
        model.load_state_dict(state)
        return max((p - q).abs().max().item()
                   for p, q in zip(saved_model.parameters(), model.parameters()))

    for algo in ("plain", "broadcast", "gather_object"):
        results[algo] = run_one(lambda algo=algo: load(algo))
    return {"subops": results, "save_seconds": save_s}


DIST_CHECKS = {
    "ckpt_fully_parallel": dist_ckpt_fully_parallel,
    "uneven_collectives": dist_uneven_collectives,
    "tp2ep2": dist_tp2ep2,
    "ep2": dist_ep2,
    "tp2": dist_tp2,
    "distopt": dist_distopt,
    "vpp": dist_vpp,
    "moe_forward_ep2": dist_moe_forward_ep2,
    "moe_forward_etp2": dist_moe_forward_etp2,
}


OUT_DIR = None


def main_dist(names, out_dir):
    global OUT_DIR
    OUT_DIR = out_dir
    applied = cpu.apply_cpu_redirections()
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    for name in names:
        rec = run_one(DIST_CHECKS[name])
        rec.update(check=name, rank=rank, applied=applied)
        Path(out_dir, f"{name}.rank{rank}.json").write_text(json.dumps(rec, default=str))
    if os.environ.get(cpu.SKIP_ENV_VAR):
        # Apply the left-out redirection(s) in the same processes: the same checks must pass.
        os.environ.pop(cpu.SKIP_ENV_VAR)
        applied = cpu.apply_cpu_redirections()
        for name in names:
            rec = run_one(DIST_CHECKS[name])
            rec.update(check=name, rank=rank, applied=applied)
            Path(out_dir, f"{name}.after.rank{rank}.json").write_text(json.dumps(rec, default=str))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "single":
        main_single(sys.argv[2])
    elif mode == "dist":
        main_dist(sys.argv[2].split(","), sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode}")
