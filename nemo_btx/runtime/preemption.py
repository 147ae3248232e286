"""Stop a training stage cleanly before a time limit (Slurm sends USR1) or when preempted (TERM).

The job scripts ask sbatch for `--signal=B:USR1@<cluster.signal_seconds>`: the batch shell gets
USR1 that long before the time limit, touches the file named by $NEMO_BTX_STOP_FILE, waits for
the stage to finish, and requeues the job (`scontrol requeue`) when the stage exited non-zero. A
file, not a signal, reaches the ranks because torchrun does not forward USR1 to its workers (its
own default action for USR1 is to die). A process that gets USR1 itself (srun launching ranks
directly, or `scancel --signal=USR1`) is covered too: `install()` turns USR1 and TERM into the
same flag. A preemption sends TERM to the batch shell and to every step's processes; the shell
treats it like USR1 (the stop file), so the ranks checkpoint at the same step within Slurm's
GraceTime, and Slurm requeues the preempted job itself.

The training loop calls `stop_requested()` after each step on every rank; all ranks agree
(an all-reduce), save a checkpoint at the same step and leave with `Requeue` (exit code 75).
The requeued job runs the same command and resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal

STOP_FILE_ENV = "NEMO_BTX_STOP_FILE"
#: Exit code of a stage that stopped early to be requeued (EX_TEMPFAIL: "try again later").
EXIT_REQUEUE = 75

_requested = False


def _on_signal(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    global _requested
    _requested = True


#: USR1: Slurm's warning before the time limit (--signal); TERM: a preemption or `scancel`
#: (Slurm sends TERM, then KILL after the partition's GraceTime).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def install(signals=STOP_SIGNALS) -> None:
    """Turn `signals` into a stop request (only a flag is set; the loop decides when to stop)."""
    for sig in signals:
        signal.signal(sig, _on_signal)


def requested_locally() -> bool:
    """This process got the signal, or the job script created the stop file."""
    path = os.environ.get(STOP_FILE_ENV)
    return _requested or bool(path and os.path.exists(path))


def stop_requested() -> bool:
    """True on every rank as soon as any rank saw a stop request.

    Collective when torch.distributed is initialised: call it on every rank at the same step.
    """
    local = requested_locally()
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return local
    device = "cpu"
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


class Requeue(SystemExit):
    """Raised after the checkpoint is saved: the process exits with EXIT_REQUEUE, and the job
    script requeues the job. A SystemExit, so the command line passes it through unchanged."""

    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUE)


def reset() -> None:
    """Forget a stop request (tests)."""
    global _requested
    _requested = False
