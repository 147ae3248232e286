"""The converter: N dense checkpoints in, one megatron-core MoE checkpoint out, as a parallel job.

It runs at the *target* layout (e.g. EP=4 x TP=2 on a node), one process per rank, and every
rank handles only the slices it will write:

    plan shards     meta-built MoE -> this rank's slices; owners balanced over replicas
    agree           every rank checks its mapping; one error stops all ranks together
    router data     (router_init=data only) each source's hidden-state means at TP/PP
    read            source by source, stored chunk by stored chunk: expert slices mapped
                    from the page cache (or copied), everything else weighted into the
                    rank's own buffers in source order
    agree           NaN/Inf or unreadable data on any rank stops all ranks
    routers         owned router slices initialised
    write           dist_checkpointing.save into a staging directory, marker and manifest
                    inside it, then one rename

Why stream instead of loading each source model and building the MoE: a loaded source costs
a whole dense model per rank (its TP/PP shard, replicated over EP), and a built MoE holds every
replicated tensor on every EP rank. Here a rank holds only its own output shard plus one stored
chunk in flight (at most the largest input tensor), so the per-rank peak halves when the ranks
double (bench/mix.py measures it).

Where the time goes (bench/mix.py, 4 x 271M experts): reading is page-fault and memcpy bound,
so chunks land directly in their destination (no torch.load temporaries) and expert slices are
not even copied; writing is megatron's writer (torch.save per chunk in forked writers, then
fsync), whose result-queue process is started in the background at the beginning so its
interpreter start-up overlaps the reading, and whose records skip the CRC-32 (write.py), the
largest cost of the write after the disk itself.

Averages are computed elementwise in source order with separately rounded multiply and add
(`acc = w_0 * x_0`, then `acc += w_s * x_s`), so every element's value is independent of the
layout and of which rank computed it: mixes at EP=1, EP=2 and TP=2 are bitwise identical.
"""

from __future__ import annotations

import logging
import time
from typing import List, Optional

import torch

from nemo_btx.errors import BtxError, CheckpointError
from nemo_btx.mixing.plan import MixPlan
from nemo_btx.mixing.recipe import FFN, ROUTER, SHARED
from nemo_btx.mixing.router import BatchesFor, hidden_state_means, init_router
from nemo_btx.mixing.shards import (
    OutShard, add_average_reads, add_expert_reads, allocate, assign_owners, target_shards)
from nemo_btx.mixing.sources import SliceReader, largest_tensor_bytes

log = logging.getLogger(__name__)


def agree(errors: List[str]) -> None:
    """Collective: if any rank recorded an error, every rank raises the first one."""
    every: List[list] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, list(errors))
    for rank, errs in enumerate(every):
        if errs:
            raise CheckpointError(errs[0] if rank == torch.distributed.get_rank() or len(every) == 1
                                  else f"(rank {rank}) {errs[0]}")


def _prestart_checkpoint_writer():
    """Start megatron's checkpoint-writer result queue (a spawned manager process, 1-2 s of
    interpreter start-up) in the background now, so that it overlaps the reading instead of
    delaying the write. Private megatron API: if it is not there, the save starts it itself."""
    import threading

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        start = filesystem_async._get_write_results_queue
    except (ImportError, AttributeError):
        return None
    thread = threading.Thread(target=start, name="btx-ckpt-writer-queue", daemon=True)
    thread.start()
    return thread


def _plan_reads(plan: MixPlan, shards: List[OutShard], readers: List[SliceReader],
                rank: int, accumulate: torch.dtype) -> None:
    glu = plan.dense_model.activation == "swiglu"
    for shard in shards:
        if shard.owner != rank:
            continue
        if shard.kind == FFN:
            add_expert_reads(shard, readers, plan.layout, plan.dense_model.ffn_hidden_size, glu)
            continue
        shard.data = allocate(shard, accumulate)
        if shard.kind == SHARED:
            add_average_reads(shard, shard.data, readers, plan.recipe.averaged)


def mix_checkpoint(cfg, plan: MixPlan, *, batches_for: Optional[BatchesFor] = None,
                   manifest_extra: Optional[dict] = None) -> dict:
    """Collective over the job (already initialised at `cfg.parallel`): write `plan.out`.

    `cfg` is the experiment config with the MoE model (`plan.moe_config(cfg)`), and the
    sources must have passed `plan.inspect_sources` (their markers and indexes are used here).
    Returns this rank's statistics (bytes read and written, seconds per phase).
    """
    from nemo_btx.mixing.write import write_mixed
    from nemo_btx.model.build import build_model

    rank = torch.distributed.get_rank()
    t0 = time.perf_counter()
    times = {}

    writer_queue = _prestart_checkpoint_writer()
    chunks = build_model(cfg, shapes_only=True)
    shards, objects = target_shards(chunks)
    del chunks
    load = assign_owners(shards)
    readers = [SliceReader(src) for src in plan.sources]
    accumulate = torch.float32
    errors: List[str] = []
    try:
        _plan_reads(plan, shards, readers, rank, accumulate)
    except BtxError as err:
        errors.append(str(err))
    agree(errors)
    times["plan"] = time.perf_counter() - t0

    means = {}
    if plan.recipe.router_init == "data":
        if batches_for is None:
            raise CheckpointError("router_init=data needs token batches per source (batches_for)")
        t = time.perf_counter()
        for i, src in enumerate(plan.sources):
            means[i] = hidden_state_means(plan.dense_config(cfg), src, batches_for(src))
        times["router_data"] = time.perf_counter() - t

    t = time.perf_counter()
    bytes_read = 0
    for reader in readers:
        if errors:
            break
        try:
            bytes_read += reader.run()
        except BtxError as err:
            errors.append(str(err))
        errors.extend(reader.errors)
    agree(errors)
    times["read"] = time.perf_counter() - t

    m = plan.moe_model
    for shard in shards:
        if shard.owner == rank and shard.kind == ROUTER:
            init_router(plan.recipe, shard.data, shard.region, hidden=m.hidden_size,
                        std=m.init_method_std, means=means)
        if shard.data is not None and shard.data.dtype != shard.sh.dtype:
            shard.data = shard.data.to(shard.sh.dtype)  # fp32 accumulator -> bf16 weights

    t = time.perf_counter()
    if writer_queue is not None:
        writer_queue.join()
    stats = {"rank": rank, "bytes_read": bytes_read, "bytes_written": load[rank],
             "owned_bytes": load, "largest_input_tensor_bytes": largest_tensor_bytes(plan.sources)}
    write_mixed(plan, cfg, shards, objects, extra_manifest=manifest_extra or {}, stats=stats)
    times["write"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    stats["seconds"] = times
    log.info("mix: rank %d read %.1f MB, wrote %.1f MB in %.1f s (%s)", rank, bytes_read / 1e6,
             load[rank] / 1e6, times["total"],
             ", ".join(f"{k} {v:.1f}s" for k, v in times.items() if k != "total"))
    return stats
