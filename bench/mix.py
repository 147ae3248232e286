#!/usr/bin/env python
"""Mix benchmark: four ~250M-parameter dense experts -> one MoE, at EP=1 and at EP=2.

Issue 4's targets, measured here:

* memory: no process holds all inputs or the whole MoE; each rank's peak RSS, minus the RSS of
  an idle process that has imported torch + megatron-core and started the runtime, must stay
  under 1.5 x (that rank's own output shard + the largest single input tensor), so doubling
  the ranks halves the per-rank peak;
* time: wall time within 1.5 x the I/O floor = reading every input byte once (`cat` of every
  input file to /dev/null) + writing every output byte once (`cp` of the output files, then
  `sync` on them, since the checkpoint writer fsyncs every file too).

Page cache: it cannot be dropped here (no root on the host), so everything is measured WARM:
the inputs are read once with `cat` before any timed step, and both the floor and the mixes
then read them from memory. Writes go through the page cache plus fsync in both the floor and
the mix. The floor is measured in the same run, between the mixes, on the same files.

Steps (all in --dir, default /tmp/btx-bench-mix, reused if present):
  1. four random dense Llama-like checkpoints written with `save_model_weights`
     (hidden 1024, 16 layers, 16 heads, SwiGLU FFN 2816, vocab 32000: 271M parameters, 1.08 GB);
  2. the idle baseline process;
  3. `nemo-btx mix` via torchrun at EP=1 (1 process) and EP=2 (2 processes), mix.include_seed
     false (four experts -> 4 experts), each rank reporting its peak RSS and shard;
  4. the I/O floor.

    .venv/bin/python bench/mix.py [--dir DIR] [--json OUT] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODEL = ["model.num_layers=16", "model.hidden_size=1024", "model.num_attention_heads=16",
         "model.ffn_hidden_size=2816", "model.vocab_size=32000", "model.seq_length=512",
         "train.micro_batch_size=1", "train.global_batch_size=2"]
NUM_EXPERTS = 4


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_busy() -> float:
    """Seconds of busy CPU on the whole machine so far (all processes)."""
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts) - idle) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------- subprocess modes


def mode_make(directory: str, overrides) -> None:
    """Write NUM_EXPERTS random dense checkpoints (one process)."""
    import torch

    from nemo_btx.config import load_config
    from nemo_btx.model.build import build_model, count_parameters
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training.checkpoint import is_complete, save_model_weights

    cfg = load_config(overrides)
    init_runtime(cfg)
    for i in range(NUM_EXPERTS):
        out = Path(directory) / f"expert{i}"
        if is_complete(out):
            continue
        torch.manual_seed(1000 + i)
        chunks = build_model(cfg, wrap_ddp=False)
        print(f"expert{i}: {count_parameters(chunks) / 1e6:.1f}M parameters", flush=True)
        save_model_weights(chunks, out, cfg.model)
        del chunks
    shutdown()


def mode_idle(out_json: str, overrides) -> None:
    """The baseline: torch + megatron-core + the converter imported, runtime started, idle."""
    from nemo_btx.config import load_config
    from nemo_btx.mixing import convert, job  # noqa: F401
    from nemo_btx.model.build import build_model  # noqa: F401
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from megatron.core.models.gpt import GPTModel  # noqa: F401

    init_runtime(load_config(overrides))
    Path(out_json).write_text(json.dumps({"peak_rss_kb": _rss_kb()}))
    shutdown()


def mode_rank(out_prefix: str, overrides) -> None:
    """One rank of `nemo-btx mix` (what the CLI runs), reporting its own figures."""
    from nemo_btx.config import load_config, validate
    from nemo_btx.mixing.job import run_plan
    from nemo_btx.mixing.plan import plan_mix

    t0 = time.perf_counter()
    cfg = load_config(overrides)
    validate(cfg)
    stats = run_plan(cfg, plan_mix(cfg))
    rank = int(os.environ.get("RANK", "0"))
    stats = dict(stats or {}, job_seconds=time.perf_counter() - t0, peak_rss_kb=_rss_kb(),
                 children_peak_rss_kb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    Path(f"{out_prefix}.rank{rank}.json").write_text(json.dumps(stats))


# --------------------------------------------------------------------------------- driver


def _files(path: Path):
    return sorted(p for p in path.iterdir() if p.is_file())


def _settle() -> None:
    """Finish pending writeback (no cache drop) so a timed step does not pay for the last one."""
    subprocess.run(["sync"], check=True)


def _timed(cmd, **kw) -> float:
    _settle()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, **kw)
    return time.perf_counter() - t


def io_floor(inputs, output: Path, scratch: Path) -> dict:
    """cat every input file once; cp + sync the output files once."""
    in_files = [str(f) for d in inputs for f in _files(d)]
    t_read = _timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *in_files])
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    out_files = [str(f) for f in _files(output)]
    t_write = _timed(["sh", "-c", 'cp "$@" "$0" && sync "$0"/*', str(scratch), *out_files])
    _settle()
    shutil.rmtree(scratch)
    return {"read_s": t_read, "write_s": t_write, "floor_s": t_read + t_write,
            "input_bytes": sum(os.path.getsize(f) for f in in_files),
            "output_bytes": sum(os.path.getsize(f) for f in out_files)}


def run_mix(workdir: Path, experts, nproc: int, extra) -> dict:
    out = workdir / f"mixed-ep{nproc}"
    if out.exists():
        shutil.rmtree(out)
    prefix = workdir / f"ep{nproc}"
    overrides = [*MODEL, f"run.dir={workdir}", "mix.include_seed=false",
                 "mix.experts=[" + ",".join(str(e) for e in experts) + "]", f"mix.out={out}",
                 f"model.moe.num_experts={NUM_EXPERTS}", f"parallel.ep={nproc}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(29400 + nproc),
           str(Path(__file__).resolve()), "_rank", str(prefix), *overrides]
    busy0, load0 = _cpu_busy(), os.getloadavg()[0]
    _settle()
    self0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    # One thread per rank (torchrun's own default for several processes): the converter's
    # arithmetic is memory-bound, and two OpenMP threads on two busy cores stall for seconds.
    proc = subprocess.run(cmd, cwd=REPO, env=_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"mix at EP={nproc} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    self1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    ranks = [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(nproc)]
    return {"nproc": nproc, "wall_s": wall, "ranks": ranks, "out": str(out),
            "others_cpu_cores": max(0.0, (_cpu_busy() - busy0 - ours) / wall),
            "loadavg_before": load0, "loadavg_after": os.getloadavg()[0]}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/btx-bench-mix")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of (floor, EP=1, EP=2), interleaved so machine noise hits all")
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = MODEL + list(args.overrides)

    t = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "_make", str(workdir), *model],
                   cwd=REPO, env=_env(), check=True)
    print(f"inputs ready ({time.perf_counter() - t:.0f} s)", flush=True)
    experts = [workdir / f"expert{i}" for i in range(NUM_EXPERTS)]

    idle_json = workdir / "idle.json"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "_idle", str(idle_json), *model],
                   cwd=REPO, env=_env(OMP_NUM_THREADS="1"), check=True)
    idle_kb = json.loads(idle_json.read_text())["peak_rss_kb"]

    # Warm the page cache once, so that every timed step below reads from memory alike.
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat",
                    *[str(f) for d in experts for f in _files(d)]], check=True)
    floors, runs = [], {1: [], 2: []}
    for rep in range(args.repeats):
        for nproc in (1, 2):
            run = run_mix(workdir, experts, nproc, args.overrides)
            runs[nproc].append(run)
            floors.append(io_floor(experts, Path(run["out"]), workdir / "floor-copy"))
            shutil.rmtree(run["out"], ignore_errors=True)
            print(f"round {rep + 1}: EP={nproc} {run['wall_s']:.1f} s (converter "
                  f"{max(r['seconds']['total'] for r in run['ranks']):.1f} s), floor "
                  f"{floors[-1]['floor_s']:.1f} s, others' CPU {run['others_cpu_cores']:.2f} cores",
                  flush=True)

    floor_med = _median([f["floor_s"] for f in floors])
    floor_min = min(f["floor_s"] for f in floors)
    f0 = floors[0]
    print(f"\nidle process (torch + megatron-core imported, runtime up): {idle_kb / 1024:.0f} MiB")
    print(f"I/O floor over {len(floors)} measurements: read {f0['input_bytes'] / 1e9:.2f} GB "
          f"(cat: median {_median([f['read_s'] for f in floors]):.2f} s), write "
          f"{f0['output_bytes'] / 1e9:.2f} GB (cp + sync: median "
          f"{_median([f['write_s'] for f in floors]):.2f} s) -> floor median {floor_med:.1f} s, "
          f"best {floor_min:.1f} s")
    report = {"idle_rss_kb": idle_kb, "floors": floors, "floor_median_s": floor_med,
              "floor_best_s": floor_min, "runs": {str(k): v for k, v in runs.items()},
              "model_overrides": model}
    summary = {}
    for nproc, reps in runs.items():
        walls = [r["wall_s"] for r in reps]
        conv = [max(rk["seconds"]["total"] for rk in r["ranks"]) for r in reps]
        jobs = [max(rk["job_seconds"] for rk in r["ranks"]) for r in reps]
        others = [r["others_cpu_cores"] for r in reps]
        print(f"\nEP={nproc} ({nproc} process{'es' if nproc > 1 else ''}), {len(reps)} runs; "
              f"others' CPU during the runs {min(others):.2f}-{max(others):.2f} cores, loadavg "
              f"{min(r['loadavg_before'] for r in reps):.1f}-{max(r['loadavg_after'] for r in reps):.1f}")
        print(f"  wall: converter median {_median(conv):.1f} s (best {min(conv):.1f}), job (config to "
              f"manifest, in-process) {_median(jobs):.1f} s, end to end (torchrun launch to exit) "
              f"{_median(walls):.1f} s")
        print(f"  ratio to the I/O floor (median/median, best/best): converter "
              f"{_median(conv) / floor_med:.2f} / {min(conv) / floor_min:.2f}, job "
              f"{_median(jobs) / floor_med:.2f} / {min(jobs) / floor_min:.2f}, end to end "
              f"{_median(walls) / floor_med:.2f} / {min(walls) / floor_min:.2f}")
        phases = {k: _median([max(rk["seconds"].get(k, 0) for rk in r["ranks"]) for r in reps])
                  for k in reps[0]["ranks"][0]["seconds"] if k != "total"}
        print(f"  converter phases (median): {', '.join(f'{k} {v:.1f} s' for k, v in phases.items())}")
        per_rank = []
        for rank in range(nproc):
            peak = max(r["ranks"][rank]["peak_rss_kb"] for r in reps) * 1024
            rk = reps[0]["ranks"][rank]
            growth = peak - idle_kb * 1024
            shard, largest = rk["bytes_written"], rk["largest_input_tensor_bytes"]
            bound = 1.5 * (shard + largest)
            per_rank.append({"rank": rank, "peak_rss": peak, "peak_minus_idle": growth,
                             "own_shard": shard, "largest_input_tensor": largest, "bound": bound,
                             "bytes_read": rk["bytes_read"]})
            print(f"  rank {rank}: peak RSS {peak / 2**20:.0f} MiB (max of runs), minus idle "
                  f"{growth / 2**20:.0f} MiB; own shard {shard / 2**20:.0f} MiB + largest input "
                  f"tensor {largest / 2**20:.0f} MiB -> bound 1.5 x {(shard + largest) / 2**20:.0f} "
                  f"= {bound / 2**20:.0f} MiB: peak/bound {growth / bound:.2f} (peak/(shard+largest) "
                  f"{growth / (shard + largest):.2f}); read {rk['bytes_read'] / 1e9:.2f} GB")
        summary[nproc] = {"converter_median_s": _median(conv), "job_median_s": _median(jobs),
                          "end_to_end_median_s": _median(walls), "per_rank": per_rank,
                          "ratio_converter": _median(conv) / floor_med,
                          "ratio_job": _median(jobs) / floor_med,
                          "ratio_end_to_end": _median(walls) / floor_med}
    report["summary"] = summary
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":  # the checkpoint writer's spawn manager re-imports __main__
    if len(sys.argv) > 1 and sys.argv[1] in ("_make", "_idle", "_rank"):
        sys.path.insert(0, str(REPO))
        from nemo_btx.log import init_logger

        init_logger("INFO" if sys.argv[1] == "_rank" else "WARNING")
        {"_make": lambda a: mode_make(a[0], a[1:]), "_idle": lambda a: mode_idle(a[0], a[1:]),
         "_rank": lambda a: mode_rank(a[0], a[1:])}[sys.argv[1]](sys.argv[2:])
    else:
        main()
