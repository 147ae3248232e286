"""Checkpoints as megatron-core distributed checkpoints (torch_dist), written atomically.

A distributed checkpoint stores every tensor with its global shape and each rank's offsets, so
weights saved at one layout (TP/PP/EP/VP) load at any other: that is how the parallel tests get
identical starting weights everywhere, how a run resumes at a new layout, and how a mixed MoE
loads at any expert layout.

On disk, a training run's directory holds:

    checkpoints/step-000040/    model + optimizer + scheduler + RNG + data position
        btx_checkpoint.json     written last, inside the directory, before the rename
    weights/                    final model weights only (what branch/mix/eval read)
        btx_checkpoint.json

Every checkpoint is written to a hidden temporary directory beside its final name and renamed
into place only after all ranks finished writing and the marker file exists. A directory
without the marker is never loaded; leftover temporaries from a killed run are deleted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from nemo_btx.artifacts import read_json, software_versions, write_json_atomic
from nemo_btx.config.schema import SHAPE_FIELDS, recorded
from nemo_btx.errors import CheckpointError
from nemo_btx.model.build import unwrap
from nemo_btx.run_dir import CHECKPOINT_MARKER, RunDir

log = logging.getLogger(__name__)

MARKER = CHECKPOINT_MARKER
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    """`{"model": ...}`, or `{"model0": ..., "model1": ...}` with virtual pipeline chunks.

    The dict keys are only containers: tensors are matched by their global ShardedTensor keys
    (layer numbers are global), so a VP=2 checkpoint and a VP=1 checkpoint are interchangeable.
    """
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _optimizer_metadata(gather: str = "dp0") -> dict:
    # fully_reshardable: distributed-optimizer state is stored per model tensor, so it reshards
    # to other TP/PP/DP layouts like the weights do (megatron-core 0.16's recommended format;
    # fully_sharded_model_space is deprecated and refuses flattened ranges). To write it, the
    # shards are gathered: `dp0` (train.optimizer_save_gather) over the gloo data-parallel
    # groups onto data-parallel rank 0 only, which alone holds its model-parallel shard's whole
    # state in host memory; `all` with NCCL onto every rank (faster, but every rank holds that
    # state: 8 x ~40 GB per node for a 7B expert at TP2). On CPU only `dp0` exists (no NCCL).
    efficient = gather == "dp0" or not torch.cuda.is_available()
    return {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
            "distrib_optim_fully_reshardable_mem_efficient": efficient}


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_complete(path: Path) -> bool:
    return RunDir.checkpoint_complete(path)


def read_marker(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER}); it was not fully "
                              "written and will not be loaded")
    try:
        return read_json(path / MARKER)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / MARKER}: unreadable ({err})") from None


def verify_files(path: Path) -> None:
    """Every shard file the checkpoint's metadata refers to exists and is long enough.

    Cheap (reads only the metadata) and catches the common corruptions, a missing or truncated
    shard from an interrupted copy, with a message naming the file, before any rank starts a
    collective load that would fail deep inside torch.distributed.checkpoint.
    """
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata (.metadata): {err}") from None
    needed: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: shard missing from the checkpoint")
        if f.stat().st_size < size:
            raise CheckpointError(f"{f}: shard truncated ({f.stat().st_size} bytes, the metadata "
                                  f"needs {size})")


def _load(template: dict, path: Path) -> dict:
    """dist_checkpointing.load with every failure turned into one CheckpointError line."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    verify_files(path)
    try:
        return dist_checkpointing.load(template, str(path))
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        lines = [x for x in str(err).splitlines() if x.strip() and "Traceback" not in x]
        raise CheckpointError(f"{path}: cannot load: {(lines[-1] if lines else repr(err))[:500]}") from None


def _write(path: Path, state: dict, marker: dict, saver: Optional["AsyncSaver"] = None,
           then: Optional[Callable[[], None]] = None) -> None:
    """Collective save into a temporary sibling, then rename: readers never see half a checkpoint.

    With `saver`, the tensors are written by a background process while training goes on; the
    marker and the rename (and `then`) happen when the saver finalises the write, on every rank."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    if _rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()

    def publish() -> None:
        _barrier()
        if _rank0():
            write_json_atomic(tmp / MARKER, marker)
            if path.exists():
                # Only ever a complete checkpoint of the same step (a re-run of a finished save).
                shutil.rmtree(path)
            os.replace(tmp, path)
            if then is not None:
                then()
        _barrier()

    if saver is None:
        dist_checkpointing.save(state, str(tmp))
        publish()
        return
    request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
    request.add_finalize_fn(publish)
    saver.schedule(request)


class AsyncSaver:
    """Training checkpoints written in the background (train.async_save): megatron-core's async
    torch_dist save copies this rank's tensors to host memory, a forked process writes them, and
    the checkpoint is published (marker, rename, pruning) once every rank's write finished. At
    most one save is in flight: the next one first waits for the previous."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()

    def schedule(self, request) -> None:
        self.wait()
        self.queue.schedule_async_request(request)

    def poll(self) -> None:
        """Collective: publish a finished save (call on every rank at the same step)."""
        self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Collective: block until every save in flight is published."""
        self.queue.maybe_finalize_async_calls(blocking=True)


def make_marker(kind: str, layout: dict, model_cfg, extra: Optional[dict] = None) -> dict:
    # `id` names these weights wherever they are copied (run_dir.checkpoint_identity): results
    # of an evaluation are keyed by it, never by the directory's name.
    from nemo_btx.model.build import KERNELS

    return {"format_version": FORMAT_VERSION, "id": uuid.uuid4().hex, "kind": kind, "layout": layout,
            "model": dataclasses.asdict(model_cfg), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": software_versions(), "kernels": dict(KERNELS), **(extra or {})}




def check_compatible(path: Path, marker: dict, model_cfg) -> None:
    """Name the first shape-deciding field where the checkpoint and the config disagree."""
    saved = marker.get("model")
    if saved is None:
        return
    want = dataclasses.asdict(model_cfg)
    for name in SHAPE_FIELDS:
        if recorded(saved, name) != want.get(name):
            raise CheckpointError(f"{path}: model.{name} is {recorded(saved, name)!r} in the checkpoint "
                                  f"but {want.get(name)!r} in this config")
    a, b = saved.get("moe", {}).get("num_experts"), want["moe"]["num_experts"]
    if a != b:
        raise CheckpointError(f"{path}: model.moe.num_experts is {a!r} in the checkpoint but "
                              f"{b!r} in this config")


def current_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": torch.distributed.get_world_size(),
            "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


# ----------------------------------------------------------------------------- model weights


def save_model_weights(chunks: List[torch.nn.Module], directory: Path, model_cfg,
                       extra: Optional[dict] = None) -> None:
    """Collective: write the model's weights only (no optimizer state) as a complete checkpoint."""
    _write(Path(directory), model_sharded_state_dict(chunks),
           make_marker("weights", current_layout(), model_cfg, extra))


def load_model_weights(chunks: List[torch.nn.Module], directory: Path, model_cfg=None) -> dict:
    """Collective: read this rank's slices of every tensor into the chunks; return the marker.

    Works for weights-only directories and full training checkpoints alike (the optimizer part
    of a full checkpoint is simply not requested).
    """
    marker = read_marker(directory)
    if model_cfg is not None:
        check_compatible(Path(directory), marker, model_cfg)
    sharded = model_sharded_state_dict(chunks)
    loaded = _load(sharded, Path(directory))
    for name, chunk in zip(sharded, chunks):  # dicts keep insertion order: model0, model1, ...
        missing, unexpected = unwrap(chunk).load_state_dict(loaded[name], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"{directory}: checkpoint lacks {len(missing)} tensors of this "
                                  f"model, e.g. {missing[:3]}")
    return marker


# ------------------------------------------------------------------------ training checkpoints


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete step directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def clean_incomplete(root: Path) -> List[Path]:
    """Delete temporaries and unmarked step directories a killed run left behind (rank 0)."""
    root = Path(root)
    removed = []
    if _rank0() and root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or (_STEP_DIR.match(p.name) and not is_complete(p))):
                shutil.rmtree(p)
                removed.append(p)
    _barrier()
    for p in removed:
        log.warning("removed incomplete checkpoint %s", p)
    return removed


def _rng_state() -> dict:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _training_state(chunks, optimizer, scheduler, step: int, extra: dict, loading: bool,
                    gather: str = "dp0") -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = model_sharded_state_dict(chunks)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    state = dict(model_sd)
    state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading,
                                                      metadata=_optimizer_metadata(gather))
    state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    state["extra"] = extra
    # RNG streams are per rank: stored as one object per rank of this layout.
    state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def save_training_checkpoint(root: Path, chunks, optimizer, scheduler, step: int, model_cfg,
                             extra: Optional[dict] = None, keep: int = 2, gather: str = "dp0",
                             saver: Optional[AsyncSaver] = None) -> Path:
    """Collective: model, optimizer, LR schedule, RNG and data position after `step` steps
    (published when `saver` finalises it, with `saver`)."""
    path = step_dir(root, step)
    state = _training_state(chunks, optimizer, scheduler, step, extra or {}, loading=False, gather=gather)

    def prune() -> None:  # rank 0, once the new checkpoint is in place
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    _write(path, state, make_marker("training", current_layout(), model_cfg,
                                {"step": step, **(extra or {})}), saver=saver, then=prune)
    return path


def load_training_checkpoint(path: Path, chunks, optimizer, scheduler, model_cfg=None) -> dict:
    """Collective: restore everything `save_training_checkpoint` wrote; return step and extra.

    RNG state is restored only when the layout is the one it was saved at (each rank's stream
    belongs to that rank); at another layout the run reseeds from (seed, step) instead.
    """
    marker = read_marker(path)
    if marker.get("kind") != "training":
        raise CheckpointError(f"{path}: a {marker.get('kind')!r} checkpoint, not a training one")
    if model_cfg is not None:
        check_compatible(Path(path), marker, model_cfg)
    same_layout = marker.get("layout") == current_layout()
    template = _training_state(chunks, optimizer, scheduler, 0, {}, loading=True)
    if not same_layout:
        template.pop("rng")
    loaded = _load(template, Path(path))
    for name, chunk in zip(model_sharded_state_dict(chunks), chunks):
        unwrap(chunk).load_state_dict(loaded[name], strict=False)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng"])
    return {"step": int(loaded["step"]), "extra": loaded["extra"], "same_layout": same_layout}


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a complete checkpoint at its global shape, without a process group.

    Layer tensors come stacked along a leading layer axis (megatron's global layout). For
    inspection, tests and reports; training code loads through `load_*` at its layout.
    """
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    read_marker(path)
    verify_files(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        state = _load_state_dict_from_keys(checkpoint_id=str(path))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
