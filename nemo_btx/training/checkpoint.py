"""Model weights as megatron-core distributed checkpoints (torch_dist).

A distributed checkpoint stores every tensor with its global shape and each rank's offsets, so
weights saved at one layout (TP/PP/EP/VP) load at any other: that is how the parallel tests get
identical starting weights everywhere, and how a mixed MoE loads at any expert layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

from nemo_btx.model.build import unwrap


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    """`{"model": ...}`, or `{"model0": ..., "model1": ...}` with virtual pipeline chunks.

    The dict keys are only containers: tensors are matched by their global ShardedTensor keys
    (layer numbers are global), so a VP=2 checkpoint and a VP=1 checkpoint are interchangeable.
    """
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_model_weights(chunks: List[torch.nn.Module], directory: Path) -> None:
    """Collective: every rank writes its shards of the model (no optimizer state)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if torch.distributed.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))


def load_model_weights(chunks: List[torch.nn.Module], directory: Path) -> None:
    """Collective: read this rank's slices of every tensor and copy them into the chunks."""
    from megatron.core import dist_checkpointing

    sharded = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(sharded, str(directory))
    for name, chunk in zip(sharded, chunks):  # dicts keep insertion order: model0, model1, ...
        unwrap(chunk).load_state_dict(loaded[name], strict=True)
