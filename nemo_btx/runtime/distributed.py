"""Process start-up: torch.distributed, megatron-core parallel state, RNG seeds, device.

Every training, mixing and evaluation entry point calls `init_runtime` once and `shutdown` at
the end. The same code path runs a single CPU process (a private gloo group on loopback), a
torchrun job with gloo on CPU, and an NCCL job on H100 nodes under srun/torchrun.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.config.validate import etp_of, validate
from nemo_btx.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a stage needs to know about the process it runs in."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    backend: str
    dp_size: int
    cpu_redirections: tuple
    hosts: tuple = ()
    """The host name of every rank, by rank (gathered at start-up; logged on rank 0)."""

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_backend(cfg: ExperimentConfig) -> str:
    want = cfg.parallel.backend
    cuda = torch.cuda.is_available()
    if want == "nccl" and not cuda:
        raise ConfigError("parallel.backend", want, "nccl needs CUDA GPUs; use auto or gloo on CPU")
    if want == "auto":
        return "nccl" if cuda else "gloo"
    return want


def init_runtime(cfg: ExperimentConfig) -> Runtime:
    """Validate the layout against the launched world, then initialise everything in order.

    Order matters (measured): process group -> megatron parallel state -> megatron's RNG
    trackers -> torch.manual_seed last, because with `use_cpu_initialization` the weights are
    drawn from the default CPU generator and must not depend on what the trackers consumed.
    """
    from nemo_btx.runtime.cpu import apply_cpu_redirections, check_megatron_version

    # First, before megatron-core is imported: the installed release must be the one this code
    # is written for, on GPU nodes too (the redirections are CPU-only; the pin and the
    # model/MoE/checkpoint code are not).
    check_megatron_version()

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    validate(cfg, world_size=world_size)
    if cfg.parallel.world_size is not None and cfg.parallel.world_size != world_size:
        raise ConfigError("parallel.world_size", cfg.parallel.world_size,
                          f"this job was launched with WORLD_SIZE={world_size}")
    backend = pick_backend(cfg)

    redirections: tuple = ()
    if not torch.cuda.is_available():
        redirections = tuple(apply_cpu_redirections())
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)

    if not torch.distributed.is_initialized():
        # Launched by torchrun/srun: rendezvous through MASTER_ADDR/PORT. A plain process gets
        # a private one-rank group on a free loopback port (megatron-core needs a group), and
        # ignores any MASTER_* its environment happens to carry.
        launched = "WORLD_SIZE" in os.environ
        torch.distributed.init_process_group(
            backend=backend, rank=rank, world_size=world_size,
            init_method="env://" if launched else f"tcp://127.0.0.1:{_free_port()}",
            timeout=datetime.timedelta(minutes=cfg.parallel.timeout_minutes),
        )

    dp_size = init_model_parallel(cfg)
    log.info("runtime: %s world=%d device=%s", backend, world_size, device)
    hosts = [socket.gethostname()] * world_size
    if world_size > 1:  # which machine each rank runs on: the Slurm log shows a job's spread
        torch.distributed.all_gather_object(hosts, socket.gethostname())
        log.info("runtime: rank hosts: %s", " ".join(f"{r}={h}" for r, h in enumerate(hosts)))
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank,
                   backend=backend, dp_size=dp_size, cpu_redirections=redirections, hosts=tuple(hosts))


def init_model_parallel(cfg: ExperimentConfig) -> int:
    """megatron-core's parallel state at `cfg.parallel`, then the seeds; the data-parallel size."""
    from megatron.core import parallel_state

    p = cfg.parallel
    vp = p.vp if p.vp and p.vp > 1 else None
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=vp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=etp_of(p),
        distributed_timeout_minutes=cfg.parallel.timeout_minutes,
    )
    seed_everything(cfg.train.seed)
    dp_size = parallel_state.get_data_parallel_world_size()
    log.info("runtime: layout tp=%d pp=%d vp=%s cp=%d ep=%d etp=%d dp=%d",
             p.tp, p.pp, vp, p.cp, p.ep, etp_of(p), dp_size)
    return dp_size


def relayout(cfg: ExperimentConfig) -> None:
    """Re-initialise megatron-core's parallel state at another layout in a running process
    group (evaluation: a dense model after an MoE one). Every rank must call it together."""
    from megatron.core import parallel_state

    validate(cfg, world_size=torch.distributed.get_world_size())
    parallel_state.destroy_model_parallel()
    init_model_parallel(cfg)


def seed_everything(seed: int) -> None:
    """Seed megatron's tracked RNG states (dropout in TP regions) and then the default ones."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shutdown() -> None:
    """Tear down parallel state and the process group so a process can initialise again."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
