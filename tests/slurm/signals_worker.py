"""Runs under torchrun with 2 gloo ranks: only rank 1 gets USR1, every rank must see the stop.

    python -m torch.distributed.run --nproc_per_node 2 tests/slurm/signals_worker.py OUT_DIR
"""

import os
import signal
import sys
from pathlib import Path

import torch


def main(out: str) -> None:
    from nemo_btx.runtime import preemption as signals

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    signals.install()
    before = signals.stop_requested()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    after = signals.stop_requested()
    Path(out, f"rank{rank}.txt").write_text(f"{before} {after}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
