"""Every redirection megatron-core 0.16.1 needs to run on CPU with the gloo backend.

megatron-core assumes CUDA in a handful of places (unconditional ``torch.cuda`` calls,
hard-coded ``device="cuda"`` tensor factories, ``param.type() == 'torch.cuda.FloatTensor'``
checks, collectives that only NCCL supports).  This module is the ONE place that bends those
spots so the same megatron-core code runs in a CPU-only process:

    from nemo_btx.runtime.cpu import apply_cpu_redirections
    apply_cpu_redirections()          # no-op when torch.cuda.is_available()

Each redirection is a small named function whose docstring says why it is needed;
``REDIRECTIONS`` maps name -> (why, function) in the order they are applied.  Redirections
are targeted: they patch the megatron-core module/class that needs it (or the ``torch.cuda``
namespace, whose functions can only raise in a CPU build), never the CPU behaviour of torch.

``apply_cpu_redirections(skip=...)`` and the environment variable ``NEMO_BTX_CPU_SKIP``
(comma-separated names) leave chosen redirections out; the tests use this to prove that each
one is necessary (the megatron-core operation then fails with a known error).

They are written for megatron-core ``MEGATRON_CORE_VERSION`` (0.16.1): :func:`check_megatron_version`
stops a process started with any other version with one line, unless
``$NEMO_BTX_ALLOW_MEGATRON_VERSION`` turns that into a warning.  ``runtime.init_runtime`` runs it on
GPU nodes too, where no redirection is applied.

Separately, :func:`force_batch_p2p_comm_off` guards against a SILENT wrong-gradient bug of the
interleaved pipeline schedule on gloo (see its docstring).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import threading
import types
from collections import OrderedDict
from typing import Any, Callable, Iterable, NamedTuple

import torch

from nemo_btx.errors import BtxError

logger = logging.getLogger(__name__)

#: Environment variable with comma-separated redirection names to leave out.
SKIP_ENV_VAR = "NEMO_BTX_CPU_SKIP"

#: The megatron-core release these redirections were written for and tested against (the one
#: pyproject.toml pins). `check_megatron_version` stops a process started with another one.
MEGATRON_CORE_VERSION = "0.16.1"
#: `1` runs with any other megatron-core version, a version (e.g. `0.17.0`) with that one only:
#: a loud warning at start-up instead of the error.
ALLOW_VERSION_ENV_VAR = "NEMO_BTX_ALLOW_MEGATRON_VERSION"

_CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec ('cuda', 'cuda:0', torch.device('cuda'), a CUDA ordinal) to cpu."""
    if device is None:
        return None
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, int) and not isinstance(device, bool):
        # An int device means a CUDA ordinal (e.g. torch.cuda.current_device()).
        return _CPU
    return device


# Tensor factories whose ``device`` keyword megatron-core hard-codes to "cuda".
_FACTORY_NAMES = frozenset(
    {
        "tensor",
        "as_tensor",
        "zeros",
        "ones",
        "empty",
        "full",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "arange",
        "rand",
        "randn",
        "randint",
        "randperm",
        "eye",
        "linspace",
    }
)


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None:
            kwargs["device"] = _cpu_device(device)
        return fn(*args, **kwargs)

    factory.__nemo_btx_cpu_factory__ = True  # type: ignore[attr-defined]
    return factory


_PROXY_MARK = "__nemo_btx_torch_proxy__"


def _make_torch_proxy() -> types.ModuleType:
    """A stand-in for the ``torch`` global of ONE megatron-core module.

    It is a plain ``types.ModuleType`` (so CPython's fast module attribute path still applies)
    with a PEP 562 ``__getattr__``: an attribute not yet in the proxy is fetched from the real
    ``torch`` and cached in the proxy, so from the second access on ``torch.X`` costs what it
    costs on the real module.  Overrides are per proxy: tensor factories that rewrite a CUDA
    ``device`` to cpu (``cuda_factories``) and a ``cuda`` namespace whose RNG functions act on
    the CPU generator (``rng_state``).  Nothing changes in torch itself.
    """
    proxy = types.ModuleType(torch.__name__, torch.__doc__)
    for dunder in ("__file__", "__path__", "__package__", "__spec__", "__loader__", "__version__"):
        if hasattr(torch, dunder):
            setattr(proxy, dunder, getattr(torch, dunder))
    state = {"rewrite_devices": False}

    def __getattr__(name: str) -> Any:
        value = getattr(torch, name)
        if state["rewrite_devices"] and name in _FACTORY_NAMES:
            value = _cpu_factory(value)
        proxy.__dict__[name] = value
        return value

    def enable_device_rewrite() -> None:
        state["rewrite_devices"] = True
        for name in _FACTORY_NAMES:
            proxy.__dict__[name] = _cpu_factory(getattr(torch, name))

    proxy.__getattr__ = __getattr__  # type: ignore[attr-defined]
    setattr(proxy, _PROXY_MARK, types.SimpleNamespace(enable_device_rewrite=enable_device_rewrite))
    return proxy


def is_torch_proxy(obj: Any) -> bool:
    """True for the per-module ``torch`` stand-ins installed by this module."""
    return isinstance(obj, types.ModuleType) and _PROXY_MARK in obj.__dict__


def _torch_proxy_of(module: types.ModuleType) -> types.ModuleType:
    """Install (once) and return the ``torch`` proxy of ``module``."""
    current = module.__dict__.get("torch")
    if is_torch_proxy(current):
        return current
    if current is not torch:
        raise RuntimeError(f"{module.__name__}.torch is {current!r}, expected the torch module")
    proxy = _make_torch_proxy()
    module.torch = proxy  # type: ignore[attr-defined]
    return proxy


_scoped_lock = threading.RLock()
_scoped_depth: dict = {}
_scoped_original: dict = {}


@contextlib.contextmanager
def _tensor_method_overridden(name: str, replacement: Callable):
    """While active, ``torch.Tensor.<name>`` is ``replacement`` (re-entrant; restored after).

    Used only around specific megatron-core functions that test/convert tensors through a
    Tensor METHOD (which no per-module proxy can reach).  Training is single-threaded there.
    """
    with _scoped_lock:
        if _scoped_depth.get(name, 0) == 0:
            _scoped_original[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, replacement)
        _scoped_depth[name] = _scoped_depth.get(name, 0) + 1
    try:
        yield
    finally:
        with _scoped_lock:
            _scoped_depth[name] -= 1
            if _scoped_depth[name] == 0:
                setattr(torch.Tensor, name, _scoped_original.pop(name))


def _wrap_in_scope(owner: Any, attr: str, scope: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Replace ``owner.attr`` (a function or method) by a wrapper that runs it inside ``scope()``."""
    original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    if getattr(original, "__nemo_btx_cpu__", False):
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with scope():
            return original(*args, **kwargs)

    wrapper.__nemo_btx_cpu__ = True  # type: ignore[attr-defined]
    setattr(owner, attr, wrapper)


def _import(name: str) -> types.ModuleType:
    import importlib

    return importlib.import_module(name)


# --------------------------------------------------------------------------------------------
# 1. current_device
# --------------------------------------------------------------------------------------------


def _cpu_current_device() -> torch.device:
    """CPU stand-in for ``torch.cuda.current_device()`` (installed by nemo_btx)."""
    return _CPU


def redirect_current_device() -> None:
    """``torch.cuda.current_device()`` -> ``torch.device('cpu')``.

    megatron-core uses it as the device for tensors it allocates: RotaryEmbedding moves
    ``inv_freq`` there at the first forward, the p2p communicator allocates shape/recv tensors
    there, DDP grad buffers, the router, attention and mapping buffers are created there.  In a
    CPU build it raises "Torch not compiled with CUDA enabled".  Returning a ``torch.device``
    (not an int) keeps every ``device=...`` / ``.to(...)`` use valid.
    """
    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# 2. rng_state
# --------------------------------------------------------------------------------------------

_RNG_WARNING = "CPU RNG state changed within GPU RNG context"


class _DropForkedCpuRngWarning(logging.Filter):
    """Drops CudaRNGStatesTracker.fork's 'CPU RNG state changed' warning (expected on CPU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _RNG_WARNING


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    if graph_safe:
        raise NotImplementedError("graph-safe (CUDA graph) RNG states need CUDA")
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    if graph_safe:
        raise NotImplementedError("graph-safe (CUDA graph) RNG states need CUDA")
    torch.set_rng_state(new_state)


def redirect_rng_state() -> None:
    """Megatron's "CUDA" RNG (tensor_parallel.random) -> the CPU default generator.

    ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker`` read/write the CUDA
    generator (``torch.cuda.get_rng_state`` raises "Torch not compiled with CUDA enabled";
    megatron's ``_set_cuda_rng_state`` goes through ``torch.cuda._lazy_call`` and would silently
    queue callbacks forever).  On GPU the CUDA generator is the one that dropout and
    GPU-initialised weights draw from; on CPU that role is played by the CPU default generator.
    So the semantically right redirection is to that generator, not to a private one: then
    ``tracker.fork('model-parallel-rng')`` really switches the stream that CPU dropout (and
    non-CPU-init weights) draw from to ``seed + 2718 + tp_rank``, ``fork(expert-parallel-rng)``
    to ``seed + 1024 + 100*ep_rank + etp_rank``, and leaves the default (data-parallel) stream
    exactly where it was.  A private generator would make every fork a no-op (same dropout mask
    on all TP ranks).  ``model_parallel_cuda_manual_seed(seed)`` consequently re-seeds the CPU
    generator with ``seed`` (as it re-seeds the CUDA one on GPU).
    Only ``megatron.core.tensor_parallel.random`` is patched (its two helpers and its ``torch``
    global's ``cuda.get_rng_state/set_rng_state/manual_seed``), not ``torch.cuda`` itself.  The
    tracker's "CPU RNG state changed within GPU RNG context" warning is filtered: on CPU the
    forked stream IS the CPU generator, so the change is the intended behaviour.
    """
    random_mod = _import("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = _cpu_get_rng_state
    random_mod._set_cuda_rng_state = _cpu_set_rng_state

    # random.py's view of ``torch.cuda``: RNG functions on the CPU generator, the rest of
    # torch.cuda unchanged (looked up on access).
    cuda_view = types.ModuleType("torch.cuda")
    cuda_view.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda_view.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda_view.manual_seed = torch.manual_seed
    cuda_view.manual_seed_all = torch.manual_seed
    cuda_view.random = types.SimpleNamespace(get_rng_state=cuda_view.get_rng_state,
                                             set_rng_state=cuda_view.set_rng_state)
    cuda_view.__getattr__ = lambda name: getattr(torch.cuda, name)
    proxy = _torch_proxy_of(random_mod)
    proxy.__dict__["cuda"] = cuda_view

    rng_logger = logging.getLogger(random_mod.__name__)
    if not any(isinstance(f, _DropForkedCpuRngWarning) for f in rng_logger.filters):
        rng_logger.addFilter(_DropForkedCpuRngWarning())


# --------------------------------------------------------------------------------------------
# 3. streams_events
# --------------------------------------------------------------------------------------------


class CpuStream:
    """No-op stand-in for ``torch.cuda.Stream`` (CPU work is synchronous)."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "CpuEvent":
        event = event if event is not None else CpuEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "CpuStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class CpuEvent:
    """No-op stand-in for ``torch.cuda.Event``."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.enable_timing = enable_timing

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: "CpuEvent") -> float:
        return 0.0


_DEFAULT_CPU_STREAM = CpuStream()


def _cpu_current_stream(device: Any = None) -> CpuStream:
    return _DEFAULT_CPU_STREAM


def _cpu_synchronize(device: Any = None) -> None:
    return None


def _cpu_stream_context(stream: Any = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext(stream)


_ORIGINAL_RECORD_STREAM = torch.Tensor.record_stream


def _record_stream(self: torch.Tensor, stream: Any) -> None:
    if isinstance(stream, CpuStream):
        return None
    return _ORIGINAL_RECORD_STREAM(self, stream)


def redirect_streams_events() -> None:
    """``torch.cuda.Stream/Event/synchronize/current_stream/default_stream/stream()`` -> no-ops.

    The alltoall MoE dispatcher creates a ``torch.cuda.Stream`` at construction ("torch.cuda.
    Stream requires CUDA support") and does its device-to-host copies under
    ``torch.cuda.stream(...)`` + ``record_event()/synchronize()``; the p2p communicator calls
    ``torch.cuda.synchronize()`` after batched send/recv; DDP/shared experts create streams
    when overlapping.  CPU ops are synchronous, so no-op streams/events are exact.
    ``Tensor.record_stream`` ignores only these CPU streams (anything else goes to torch).
    """
    torch.cuda.Stream = CpuStream  # type: ignore[misc,assignment]
    torch.cuda.Event = CpuEvent  # type: ignore[misc,assignment]
    torch.cuda.synchronize = _cpu_synchronize  # type: ignore[assignment]
    torch.cuda.current_stream = _cpu_current_stream  # type: ignore[assignment]
    torch.cuda.default_stream = _cpu_current_stream  # type: ignore[assignment]
    torch.cuda.stream = _cpu_stream_context  # type: ignore[assignment]
    torch.Tensor.record_stream = _record_stream  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------
# 4. te_general_gemm
# --------------------------------------------------------------------------------------------


def redirect_te_general_gemm() -> None:
    """Define ``megatron.core.transformer.moe.moe_utils.te_general_gemm = None`` if missing.

    A bug in megatron-core 0.16.1: ``moe_utils`` imports ``te_general_gemm`` only inside its
    Transformer Engine ``try`` block, but ``RouterGatingLinearFunction.forward`` tests
    ``te_general_gemm is not None`` unconditionally, so every MoE router forward without TE
    raises "NameError: name 'te_general_gemm' is not defined".  With ``None`` the router takes
    its plain ``torch.mm`` path.
    """
    moe_utils = _import("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# --------------------------------------------------------------------------------------------
# 5. alltoall_split_sizes
# --------------------------------------------------------------------------------------------


def _as_int_list(sizes: Any) -> Any:
    if sizes is None or (isinstance(sizes, list) and all(type(s) is int for s in sizes)):
        return sizes
    if torch.is_tensor(sizes):
        return [int(s) for s in sizes.tolist()]
    return [int(s) for s in sizes]


def redirect_alltoall_split_sizes() -> None:
    """``_AllToAll.forward`` (tensor_parallel.mappings) gets its split sizes as ``list[int]``.

    The alltoall MoE dispatcher computes input/output split sizes as tensors and converts them
    to numpy only when they are CUDA tensors (``maybe_move_tensor_to_cpu``); on CPU they reach
    ``torch.distributed.all_to_all_single`` as CPU tensors, which gloo's binding rejects
    ("all_to_all_single(): incompatible function arguments").  Converting in ``_AllToAll``
    also covers its backward (which calls ``_AllToAll.apply`` with the swapped sizes).
    """
    mappings = _import("megatron.core.tensor_parallel.mappings")
    cls = mappings._AllToAll
    original = cls.__dict__["forward"]
    if getattr(original, "__nemo_btx_cpu__", False):
        return
    original_fn = original.__func__ if isinstance(original, staticmethod) else original

    @functools.wraps(original_fn)
    def forward(ctx, group, input, output_split_sizes, input_split_sizes):
        return original_fn(
            ctx, group, input, _as_int_list(output_split_sizes), _as_int_list(input_split_sizes)
        )

    forward.__nemo_btx_cpu__ = True  # type: ignore[attr-defined]
    cls.forward = staticmethod(forward)


# --------------------------------------------------------------------------------------------
# 6. cuda_factories
# --------------------------------------------------------------------------------------------

#: megatron-core modules whose hard-coded ``device="cuda"`` factories are on paths a CPU run can
#: take (module -> what allocates on "cuda").  Each gets its own ``torch`` proxy.
CUDA_FACTORY_MODULES: "OrderedDict[str, str]" = OrderedDict(
    [
        ("megatron.core.pipeline_parallel.schedules", "total_num_tokens in every schedule"),
        ("megatron.core.optimizer.grad_scaler", "loss-scale tensors"),
        ("megatron.core.optimizer.optimizer", "found_inf / overflow buffers / _scale"),
        ("megatron.core.optimizer.clip_grads", "grad-norm / overflow buffers"),
        ("megatron.core.utils", "local_multi_tensor_l2_norm result (clip_grads without apex)"),
        ("megatron.core.rerun_state_machine", "_reduce_any all-reduce buffer"),
        ("megatron.core.dist_checkpointing.exchange_utils", "shard exchange buffers"),
        ("megatron.core.dist_checkpointing.mapping", "ShardedTensor.init_data('cuda')"),
        ("megatron.core.dist_checkpointing.strategies.state_dict_saver", "plan-reuse all-reduce"),
        ("megatron.core.transformer.utils", "default causal / sliding-window masks"),
        ("megatron.core.transformer.moe.moe_utils", "aux-loss logging tracker"),
        ("megatron.core.distributed.param_and_grad_buffer", "NCCL-UB warm-up tensor"),
        ("megatron.core.tensor_parallel.data", "broadcast_data size buffer"),
    ]
)


#: megatron-core modules that also hard-code ``device="cuda"`` but are deliberately NOT
#: redirected: features that need CUDA anyway or that nemo_btx does not use on CPU.
CUDA_FACTORY_NOT_REDIRECTED: "OrderedDict[str, str]" = OrderedDict(
    [
        ("megatron.core.distributed.fsdp", "Megatron-FSDP (not used; DDP + DistributedOptimizer)"),
        ("megatron.core.energy_monitor", "NVML GPU energy monitor"),
        ("megatron.core.fp8_utils", "FP8 needs Transformer Engine on GPU"),
        ("megatron.core.full_cuda_graph", "CUDA graphs"),
        ("megatron.core.fusions", "Triton/CUDA fusions (all fusions are off on CPU)"),
        ("megatron.core.inference", "inference server (not used)"),
        ("megatron.core.nccl_allocator", "NCCL user buffers"),
        ("megatron.core.pipeline_parallel.hybrid_cp_schedule", "hybrid context parallel (not used)"),
        ("megatron.core.pipeline_parallel.utils", "only torch.cuda.Stream(device='cuda'): streams_events"),
        ("megatron.core.resharding", "NVSHMEM copy service"),
        ("megatron.core.ssm", "Mamba layers (not used)"),
    ]
)


def redirect_cuda_factories() -> None:
    """Hard-coded ``device="cuda"`` in tensor factories -> cpu, in the listed modules only.

    ``schedules.py`` allocates ``total_num_tokens = torch.zeros([], ..., device="cuda")`` in
    every forward/backward function (so even PP=1 fails with "Torch not compiled with CUDA
    enabled"); the optimizer (found_inf), grad scaler, grad clipping / l2-norm fallback, the
    rerun state machine and the dist-checkpointing exchange utilities do the same.  Instead of
    patching ``torch.zeros`` & co. for the whole process, the ``torch`` global of just those
    modules (``CUDA_FACTORY_MODULES``) is replaced by a proxy whose factories rewrite a CUDA
    ``device`` argument to cpu; every other attribute is the real torch one (cached on first
    access, so the proxy costs one dict lookup like the real module).  The fully parallel
    checkpoint load's default exchange ('broadcast') also moves loaded shards with
    ``tensor.cuda()``: while that function runs, ``Tensor.cuda`` returns the tensor itself.
    (Exchange 'gather_rounds' stays unsupported on gloo: it all-gathers uneven tensors.)
    """
    for name in CUDA_FACTORY_MODULES:
        getattr(_torch_proxy_of(_import(name)), _PROXY_MARK).enable_device_rewrite()
    exchange_utils = _import("megatron.core.dist_checkpointing.exchange_utils")
    for fn_name in _CUDA_METHOD_FUNCTIONS:
        _wrap_in_scope(exchange_utils, fn_name, _cuda_method_stays_on_cpu)


#: exchange_utils functions that move loaded shards with ``tensor.cuda()`` before exchanging.
#: ('gather_rounds' is not listed: it all-gathers uneven tensor lists, which gloo cannot do;
#: on CPU use the default 'broadcast' or 'gather_object'.)
_CUDA_METHOD_FUNCTIONS = ("exchange_loaded_tensors_broadcast",)


def _cuda_method_stays_on_cpu() -> contextlib.AbstractContextManager:
    def cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        return self

    return _tensor_method_overridden("cuda", cuda)


# --------------------------------------------------------------------------------------------
# 7. torch_norm_sequence_parallel
# --------------------------------------------------------------------------------------------


def redirect_torch_norm_sequence_parallel() -> None:
    """Let ``WrappedTorchNorm`` accept ``sequence_parallel`` and mark its params for TP all-reduce.

    MoE with TP>1 requires sequence parallelism, but without Apex/TE the local spec's norm is
    ``WrappedTorchNorm``, which asserts "sequence parallel not supported by torch LayerNorm".
    A plain torch LayerNorm/RMSNorm is correct under sequence parallelism: it is applied per
    token, each TP rank on its own sequence shard.  Only its weight gradient is partial (from
    this rank's tokens), which is exactly what megatron's ``param.sequence_parallel = True``
    marker is for: ``finalize_model_grads`` then sums these grads across the TP group.  The
    class is patched in place (specs hold a reference to it); all its other checks still run.
    """
    torch_norm = _import("megatron.core.transformer.torch_norm")
    cls = torch_norm.WrappedTorchNorm
    original = cls.__dict__["__new__"]
    if getattr(original, "__nemo_btx_cpu__", False):
        return
    original_fn = original.__func__ if isinstance(original, staticmethod) else original

    @functools.wraps(original_fn)
    def __new__(klass, config, hidden_size, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return original_fn(klass, config, hidden_size, *args, **kwargs)
        unsharded = copy.copy(config)  # shallow: no __post_init__, no shared mutation
        unsharded.sequence_parallel = False
        norm = original_fn(klass, unsharded, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    __new__.__nemo_btx_cpu__ = True  # type: ignore[attr-defined]
    cls.__new__ = staticmethod(__new__)


# --------------------------------------------------------------------------------------------
# 8. distributed_optimizer_param_type
# --------------------------------------------------------------------------------------------

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_TENSOR_TYPE = torch.Tensor.type


def _type_reporting_cuda_names(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
    result = _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)
    if dtype is None and not kwargs and isinstance(result, str):
        return _CUDA_TYPE_NAMES.get(result, result)
    return result


def cpu_params_reported_as_cuda() -> contextlib.AbstractContextManager:
    """While active, ``Tensor.type()`` (no argument) names CPU float tensors as their CUDA type."""
    return _tensor_method_overridden("type", _type_reporting_cuda_names)


def redirect_distributed_optimizer_param_type() -> None:
    """DistributedOptimizer (and the fp16/bf16 optimizer, grad clipping) accept CPU float params.

    They sort parameters with string compares on ``param.type()`` ('torch.cuda.FloatTensor',
    '...HalfTensor', '...BFloat16Tensor') and raise "Wrapped parameters must be one of
    torch.cuda.FloatTensor, ..." (``clip_grad_by_total_norm_fp32`` asserts
    ``grad.type() == 'torch.cuda.FloatTensor'``) for CPU tensors.  The hook: wrap exactly
    ``DistributedOptimizer.__init__``, ``Float16OptimizerWithFloat16Params.__init__`` and
    ``clip_grad_by_total_norm_fp32`` so that, while they run, ``Tensor.type()`` without
    argument reports a CPU float tensor under its CUDA name.  Outside those calls
    ``Tensor.type`` is torch's.  (The plain fp32 megatron optimizer needs only the clip hook.)
    """
    distrib_optimizer = _import("megatron.core.optimizer.distrib_optimizer")
    optimizer = _import("megatron.core.optimizer.optimizer")
    clip_grads = _import("megatron.core.optimizer.clip_grads")
    scope = cpu_params_reported_as_cuda
    _wrap_in_scope(distrib_optimizer.DistributedOptimizer, "__init__", scope)
    _wrap_in_scope(optimizer.Float16OptimizerWithFloat16Params, "__init__", scope)
    _wrap_in_scope(clip_grads, "clip_grad_by_total_norm_fp32", scope)
    # optimizer.py imported the function by name: point it at the wrapper too.
    if getattr(optimizer, "clip_grad_by_total_norm_fp32", None) is not None:
        optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


# --------------------------------------------------------------------------------------------
# 9. gloo_uneven_collectives
# --------------------------------------------------------------------------------------------


def _is_gloo(group: Any) -> bool:
    try:
        return torch.distributed.get_backend(group) == "gloo"
    except Exception:  # pragma: no cover - not a c10d group
        return False


def _gloo_gather_uneven(input_: torch.Tensor, group: Any, output_split_sizes: list) -> torch.Tensor:
    sizes = [int(s) for s in output_split_sizes]
    world = len(sizes)
    rank = group.rank()
    assert input_.shape[0] == sizes[rank], (input_.shape, sizes, rank)
    pad_to = max(sizes)
    padded = input_.new_zeros([pad_to] + list(input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    gathered = input_.new_empty([pad_to * world] + list(input_.shape[1:]))
    torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
    return torch.cat([gathered[r * pad_to : r * pad_to + sizes[r]] for r in range(world)], dim=0)


def redirect_gloo_uneven_collectives() -> None:
    """Uneven all_gather (tensor_parallel.mappings) emulated on gloo groups.

    With expert tensor parallelism > 1 (and expert parallelism > 1, or token dropping) the
    alltoall dispatcher gathers tokens across the expert-TP group with per-rank sizes
    (``gather_from_sequence_parallel_region(..., output_split_sizes=...)``).  megatron does it
    with ``torch.distributed.all_gather`` on a list of differently sized tensors, which gloo
    rejects ("ProcessGroupGloo::allgather: invalid tensor size").  On gloo groups only, every
    rank's piece is padded to the largest size, gathered with ``all_gather_into_tensor`` and the
    padding dropped.  Even gathers and non-gloo groups go to megatron's original function.
    The matching uneven ``reduce_scatter`` (the gather's backward and the combine step) needs
    nothing: gloo in torch 2.13 handles uneven tensor lists there (measured; the test checks
    it still does).
    """
    mappings = _import("megatron.core.tensor_parallel.mappings")
    gather = mappings._gather_along_first_dim
    if getattr(gather, "__nemo_btx_cpu__", False):
        return

    @functools.wraps(gather)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if (
            output_split_sizes is not None
            and group is not None
            and group.size() > 1
            and _is_gloo(group)
        ):
            return _gloo_gather_uneven(input_, group, output_split_sizes)
        return gather(input_, group, output_split_sizes, use_global_buffer)

    _gather_along_first_dim.__nemo_btx_cpu__ = True  # type: ignore[attr-defined]
    mappings._gather_along_first_dim = _gather_along_first_dim


# --------------------------------------------------------------------------------------------
# 10. torch_adam_step_state
# --------------------------------------------------------------------------------------------


def redirect_torch_adam_step_state() -> None:
    """Resuming a DistributedOptimizer works with torch's Adam (no Apex/TE, i.e. on CPU).

    Without Apex/TE megatron steps ``torch.optim.Adam``, which keeps a per-parameter ``step``
    tensor, and the DistributedOptimizer load path breaks on it twice: building the sharded
    state dict of a never-stepped optimizer asserts on the missing ``step`` (``state_dict()``:
    ``assert len(steps) == 1``), and ``load_parameter_state_from_fully_reshardable`` copies
    every key of the live state from the checkpoint's tensors, which carry no ``step``
    (``KeyError: 'step'``); and ``load_state_dict`` hands the same ``step`` tensor to every
    parameter, which torch's Adam then increments once per parameter (a resumed run's bias
    correction jumps ahead: measured step 11 instead of 4). Fix: give a fresh optimizer zero
    Adam state (overwritten by the load) before the sharded state dict is built, and in the
    per-parameter copy give each parameter its own copy of the restored ``step``.
    """
    distrib_optimizer = _import("megatron.core.optimizer.distrib_optimizer")
    cls = distrib_optimizer.DistributedOptimizer
    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False):
        return  # Fused Adam keeps no per-parameter step: nothing to fix
    if getattr(cls.sharded_state_dict, "__nemo_btx_cpu__", False):
        return

    original_sd = cls.sharded_state_dict
    original_set = cls._set_main_param_and_optimizer_states

    @functools.wraps(original_sd)
    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        if is_loading:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    state = self.optimizer.state[p]
                    if "step" not in state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state.setdefault("exp_avg", torch.zeros_like(p.data))
                        state.setdefault("exp_avg_sq", torch.zeros_like(p.data))
        return original_sd(self, model_sharded_state_dict, is_loading=is_loading, metadata=metadata)

    @functools.wraps(original_set)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                # load_state_dict put ONE step tensor into every parameter's state; torch's
                # Adam increments it in place per parameter, so it must not be shared.
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}
        return original_set(self, model_param, tensors)

    sharded_state_dict.__nemo_btx_cpu__ = True  # type: ignore[attr-defined]
    cls.sharded_state_dict = sharded_state_dict
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


# --------------------------------------------------------------------------------------------
# The megatron-core version they were written for
# --------------------------------------------------------------------------------------------


def installed_megatron_version() -> str:
    """The installed megatron-core's version (its package metadata; its own version module for a
    source checkout on the path)."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        pass
    try:
        from megatron.core.package_info import __version__
    except ImportError:
        return "(not installed)"
    return str(__version__)


_warned_versions: set = set()


def check_megatron_version() -> str:
    """Raise BtxError unless the installed megatron-core is MEGATRON_CORE_VERSION (a local build
    label such as `+nv` is ignored), or $NEMO_BTX_ALLOW_MEGATRON_VERSION allows it: then log a
    warning (once per process and version). Returns the installed version.

    Called at every process start (`runtime.init_runtime`, on GPU nodes too, and
    `apply_cpu_redirections`): the redirections patch megatron-core 0.16.1's internals by name,
    and the rest of the code (parallel state, MoE config, the converter's checkpoint keys) is
    written against the same release, which pyproject.toml pins on every machine.
    """
    found = installed_megatron_version()
    if found.split("+", 1)[0] == MEGATRON_CORE_VERSION:
        return found
    allow = os.environ.get(ALLOW_VERSION_ENV_VAR, "").strip()
    what = (f"megatron-core {found} is installed; nemo-btx is written and tested for megatron-core "
            f"{MEGATRON_CORE_VERSION} (its CPU redirections and checkpoint layout)")
    if allow == "1" or (allow and allow == found):
        if found not in _warned_versions:
            _warned_versions.add(found)
            logger.warning("%s: running anyway because %s=%s; results are UNTESTED", what,
                           ALLOW_VERSION_ENV_VAR, allow)
        return found
    raise BtxError(f"{what}: install megatron-core=={MEGATRON_CORE_VERSION}, or set "
                   f"{ALLOW_VERSION_ENV_VAR}=1 (or ={found}) to run anyway")


# --------------------------------------------------------------------------------------------
# Registry and entry point
# --------------------------------------------------------------------------------------------


class Redirection(NamedTuple):
    why: str
    apply: Callable[[], None]


def _entry(fn: Callable[[], None]) -> Redirection:
    return Redirection((fn.__doc__ or "").strip().splitlines()[0], fn)


#: name -> (why, function), in application order.
REDIRECTIONS: "OrderedDict[str, Redirection]" = OrderedDict(
    [
        ("current_device", _entry(redirect_current_device)),
        ("rng_state", _entry(redirect_rng_state)),
        ("streams_events", _entry(redirect_streams_events)),
        ("te_general_gemm", _entry(redirect_te_general_gemm)),
        ("alltoall_split_sizes", _entry(redirect_alltoall_split_sizes)),
        ("cuda_factories", _entry(redirect_cuda_factories)),
        ("torch_norm_sequence_parallel", _entry(redirect_torch_norm_sequence_parallel)),
        ("distributed_optimizer_param_type", _entry(redirect_distributed_optimizer_param_type)),
        ("gloo_uneven_collectives", _entry(redirect_gloo_uneven_collectives)),
        ("torch_adam_step_state", _entry(redirect_torch_adam_step_state)),
    ]
)

_applied: list = []
_apply_lock = threading.Lock()


def _names_from_env() -> set:
    raw = os.environ.get(SKIP_ENV_VAR, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def applied_redirections() -> list:
    """Names of the redirections in effect in this process, in application order."""
    return [name for name in REDIRECTIONS if name in _applied]


def apply_cpu_redirections(skip: Iterable[str] = ()) -> list:
    """Apply every CPU redirection not named in ``skip`` or in ``$NEMO_BTX_CPU_SKIP``.

    Idempotent: a redirection is applied at most once per process; a later call without the
    skip applies the ones an earlier call left out.  Returns the names in effect after the
    call (in ``REDIRECTIONS`` order).  Does nothing (returns ``[]``) when CUDA is available.
    Unknown names in ``skip`` / the environment variable raise ``ValueError``; a megatron-core
    other than ``MEGATRON_CORE_VERSION`` raises ``BtxError`` (see ``check_megatron_version``).
    """
    skipped = set(skip) | _names_from_env()
    unknown = skipped - set(REDIRECTIONS)
    if unknown:
        raise ValueError(
            f"unknown CPU redirection(s) {sorted(unknown)}; known: {list(REDIRECTIONS)}"
        )
    if torch.cuda.is_available():
        return []
    check_megatron_version()
    with _apply_lock:
        for name, redirection in REDIRECTIONS.items():
            if name in skipped or name in _applied:
                continue
            redirection.apply()
            _applied.append(name)
            logger.debug("applied CPU redirection %s", name)
        if skipped:
            logger.warning("CPU redirections left out: %s", ", ".join(sorted(skipped)))
        return applied_redirections()


# --------------------------------------------------------------------------------------------
# Silent wrong-gradient guard
# --------------------------------------------------------------------------------------------


def force_batch_p2p_comm_off(config: Any, *, user_requested: bool = False) -> bool:
    """Set ``config.batch_p2p_comm = False`` on CPU/gloo; return True if it was True.

    SILENT wrong-gradient bug: the interleaved pipeline schedule (virtual pipeline 2) with
    PP=2 on gloo and ``batch_p2p_comm=True`` (megatron's default) produces WRONG gradients
    with no error (measured: forward-only passes stay right; in training even the losses of
    the later micro-batches go wrong, because activations and gradients get swapped).  With
    PP=2 the previous and the
    next stage are the same rank; a batched step posts send_prev + send_next to that rank and
    recv_prev + recv_next from it, all same-shaped and on the same group/tag, and gloo matches
    them in posting order, so an activation can land in a gradient buffer and vice versa.  The
    unbatched path (``_p2p_ops``) uses two different groups for the two directions and is
    exact.  On CPU the batched path brings no speed, so it is always turned off; a warning is
    logged when the user explicitly asked for it (``user_requested=True``).
    No-op (returns False) when CUDA is available (NCCL is not affected).
    """
    if torch.cuda.is_available():
        return False
    was_on = bool(getattr(config, "batch_p2p_comm", False))
    if was_on and user_requested:
        logger.warning(
            "batch_p2p_comm=True is not safe on CPU/gloo (interleaved PP=2 silently gives wrong "
            "gradients); using batch_p2p_comm=False"
        )
    config.batch_p2p_comm = False
    return was_on


__all__ = [
    "ALLOW_VERSION_ENV_VAR",
    "MEGATRON_CORE_VERSION",
    "REDIRECTIONS",
    "CUDA_FACTORY_MODULES",
    "CUDA_FACTORY_NOT_REDIRECTED",
    "SKIP_ENV_VAR",
    "Redirection",
    "CpuEvent",
    "CpuStream",
    "apply_cpu_redirections",
    "applied_redirections",
    "check_megatron_version",
    "cpu_params_reported_as_cuda",
    "force_batch_p2p_comm_off",
    "installed_megatron_version",
]
