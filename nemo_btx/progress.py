"""How far a stage process is, as a small JSON file its launcher reads.

`nemo-btx run` starts every unit as a child process with `NEMO_BTX_PROGRESS_FILE` set; the
training loop and the evaluation write `{"done", "total", "what", "eta_s", "time"}` there (rank
0, atomically, at most once a second), and the parent shows it. The parent never reads the
child's log text for it, so a log format can change without breaking the display. Without the
variable (a stage started by hand, a Slurm job) nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

ENV = "NEMO_BTX_PROGRESS_FILE"
#: Seconds between two writes of the same reporter (the last one is always written).
MIN_INTERVAL_S = 1.0


class Reporter:
    """Writes the progress of one kind of work (training steps, evaluation requests)."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, int(total)
        path = os.environ.get(ENV)
        is_rank0 = os.environ.get("RANK", "0") == "0"
        self.path = Path(path) if path and is_rank0 else None
        self.start = time.monotonic()
        self.first_done: Optional[int] = None
        self.last_write = 0.0

    def update(self, done: int, eta_s: Optional[float] = None) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if self.first_done is None:
            self.first_done = done
        if done < self.total and now - self.last_write < MIN_INTERVAL_S:
            return
        if eta_s is None and done > self.first_done:
            rate = (done - self.first_done) / max(now - self.start, 1e-9)
            eta_s = (self.total - done) / rate
        self.last_write = now
        record = {"what": self.what, "done": int(done), "total": self.total,
                  "eta_s": None if eta_s is None else round(float(eta_s), 1), "time": time.time()}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)
        except OSError:  # the display is best effort; never fail a stage for it
            pass


def read(path: Path) -> Optional[dict]:
    """The last record a child wrote, or None."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "done" in record and "total" in record else None


def describe(record: dict) -> str:
    """`step 5/300, eta 40 s` for the status line."""
    what = record.get("what", "")
    eta = record.get("eta_s")
    text = (f"{what} {record['done']}/{record['total']}" if what == "step"
            else f"{record['done']}/{record['total']} {what}")
    return text + (f", eta {eta:.0f} s" if isinstance(eta, (int, float)) else "")
