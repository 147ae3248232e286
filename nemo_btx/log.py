"""Logging set-up: one format, INFO on rank 0 only, so multi-process logs stay readable."""

import logging
import os
import sys
import warnings

_FORMAT = "[btx rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"


def init_logger(level: str = "INFO") -> None:
    """Configure the root logger once; called by the CLI and by torchrun entry points.

    Ranks other than 0 log warnings and errors only: with N processes every INFO line would
    otherwise appear N times.
    """
    rank = int(os.environ.get("RANK", "0"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else "WARNING")
    # Without Apex/TE (every CPU run) megatron-core warns about fallbacks at each layer build.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    # megatron-core is chatty at INFO (one line per process group); keep its warnings only.
    logging.getLogger("megatron").setLevel("WARNING")
