"""Shared fixtures: a torchrun launcher for multi-process CPU tests."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """The test process's environment without a launcher's rank variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def run_torchrun(script, args, nproc: int, timeout: float = 180, env=None):
    """`torchrun --nproc_per_node nproc script args` with a hard timeout.

    Collectives that go wrong can hang instead of failing, so every multi-process test runs
    under a timeout and reports the processes' output when it fails.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def torchrun():
    return run_torchrun


@pytest.fixture(autouse=True, scope="module")
def _fresh_megatron_state():
    """Each test module starts without megatron parallel state or a process group.

    In-process tests (model building, the lm-eval model) initialise megatron-core's global
    parallel state; a module that leaves it behind must not break the next one.
    """
    yield
    import torch

    try:
        from megatron.core import parallel_state
    except ImportError:  # pragma: no cover
        return
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
