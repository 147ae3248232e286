"""Issue 7: the whole tiny experiment (`nemo-btx run`) — wall time and peak memory.

Targets on the 2-core CPU machine: under 20 minutes, peak memory under 6 GB. Memory is the
sum of the resident set sizes of `nemo-btx run` and all its descendants (stage processes,
torchrun ranks, lm-eval's sandbox workers), sampled every 0.2 s: what the machine must hold,
not only the largest process. Also printed: per-stage wall time from the run's progress lines.

    .venv/bin/python bench/run_experiment.py --run-dir /tmp/bench-run [key=value ...]
    .venv/bin/python bench/run_experiment.py --run-dir /tmp/bench-run --json runs/bench/run.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def tree_memory(proc: psutil.Process):
    """Summed RSS and PSS of the process tree, and (rss, pss, command) per process. RSS counts
    a page shared by several processes (torch's libraries, copy-on-write pages of forked
    helpers) once per process; PSS splits it between them, so its sum is what the tree
    really occupies."""
    rss = pss = 0
    rows = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            cmd = " ".join(p.cmdline()[:6])[:160]
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        rows.append((info.rss, getattr(info, "pss", info.rss), cmd))
    return rss, pss, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a fresh directory (deleted first if it exists)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rd = Path(args.run_dir)
    if rd.exists():
        shutil.rmtree(rd)
    cmd = [sys.executable, "-m", "nemo_btx.cli", "run", f"run.dir={rd}", *args.overrides]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = {"rss": 0, "at": 0.0, "pss": 0, "pss_at": 0.0, "procs": []}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, pss, rows = tree_memory(ps)
            if rss > peak["rss"]:
                peak.update(rss=rss, at=time.monotonic() - start,
                            procs=[{"rss_mib": r >> 20, "pss_mib": q >> 20, "cmd": c} for r, q, c in rows])
            if pss > peak["pss"]:
                peak.update(pss=pss, pss_at=time.monotonic() - start)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stages = {}
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        m = re.search(r"\] (\S+)(?: on \d+ processes \(\S+\))?: done \((\d+) s\)", line)
        if m:
            stages[m.group(1)] = int(m.group(2))
    code = proc.wait()
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    figures = {"exit": code, "wall_s": round(wall, 1), "peak_rss_gib": round(peak["rss"] / 2**30, 3),
               "peak_at_s": round(peak["at"], 1), "peak_pss_gib": round(peak["pss"] / 2**30, 3),
               "peak_pss_at_s": round(peak["pss_at"], 1), "processes_at_rss_peak": peak["procs"],
               "stages_s": stages, "overrides": args.overrides,
               "cpus": psutil.cpu_count()}
    by_stage = {}
    for name, secs in stages.items():
        by_stage[name.split(":")[0]] = by_stage.get(name.split(":")[0], 0) + secs
    print(f"nemo-btx run: exit {code}, wall {wall / 60:.1f} min (target < 20), peak memory of the "
          f"process tree {peak['rss'] / 2**30:.2f} GiB RSS at {peak['at']:.0f} s, "
          f"{peak['pss'] / 2**30:.2f} GiB PSS at {peak['pss_at']:.0f} s (target < 6 GB)")
    print("per stage (s): " + ", ".join(f"{k} {v}" for k, v in by_stage.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
