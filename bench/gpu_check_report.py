"""bench/gpu_check.sh's comparison: each training stage's measured peak GPU memory, step time and
MFU (its metrics.jsonl) beside `nemo-btx plan`'s predictions, and the save/resume check.

    python bench/gpu_check_report.py OUT_DIR <the check's overrides>
    python bench/gpu_check_report.py --predict-only OUT_DIR <overrides>    # no run: the plan only

Writes OUT_DIR/gpu_check.json. Measured memory is torch's max_memory_allocated on rank 0, which
leaves out what the plan's overhead_gb stands for (CUDA context, NCCL, fragmentation), so it is
compared with the plan's total without that allowance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_btx.config import load_config  # noqa: E402
from nemo_btx.config.budgets import tokens_per_step  # noqa: E402
from nemo_btx.orchestration.planning import plan_experiment  # noqa: E402
from nemo_btx.planner.memory import GB  # noqa: E402
from nemo_btx.run_dir import RunDir  # noqa: E402


def training_dir(rd: RunDir, unit: str) -> Path:
    stage, _, item = unit.partition(":")
    if stage == "seed":
        return rd.seed
    if stage == "experts":
        return rd.expert(item)
    if stage == "finetune":
        return rd.finetuned
    return rd.baseline(item if stage == "baselines" else "dense")


def last_record(path: Path) -> dict:
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def losses(path: Path) -> list:
    if not path.is_file():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predict-only", action="store_true")
    ap.add_argument("out", type=Path)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.overrides)
    rd = RunDir.of(cfg)
    per_step = tokens_per_step(cfg)
    rows = []
    for r in plan_experiment(cfg, args.overrides):
        if r.kind != "train":
            continue
        predicted = (r.memory["total"] - r.memory.get("overhead", 0.0)) / GB
        rec = {} if args.predict_only else last_record(training_dir(rd, r.name) / "metrics.jsonl")
        measured_step = per_step / rec["tokens_per_s"] if rec.get("tokens_per_s") else None
        rows.append({"stage": r.name, "gpus": r.gpus, "layout": r.layout_name,
                     "plan_gb": predicted, "measured_gb": rec.get("peak_memory_gb"),
                     "plan_step_s": r.step_s, "measured_step_s": measured_step,
                     "plan_mfu": cfg.plan.mfu, "measured_mfu": rec.get("mfu")})
    resume = None
    if not args.predict_only:
        a, b = losses(args.out / "resume-a" / "metrics.jsonl"), losses(args.out / "resume-b" / "metrics.jsonl")
        resume = {"steps": [len(a), len(b)], "equal": bool(a) and a == b}
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{'stage':<26} {'GPUs':>4} {'plan GB':>8} {'peak GB':>8} {'plan step s':>11} {'step s':>7} {'MFU':>6}")
    for row in rows:
        print(f"{row['stage']:<26} {row['gpus']:>4} {row['plan_gb']:>8.1f} {fmt(row['measured_gb'], '8.1f'):>8} "
              f"{row['plan_step_s']:>11.2f} {fmt(row['measured_step_s'], '7.2f'):>7} "
              f"{fmt(row['measured_mfu'], '6.1%'):>6}")
    print(f"(plan GB: predicted per-GPU memory without plan.overhead_gb={cfg.plan.overhead_gb:g}; plan step s "
          f"at MFU {cfg.plan.mfu:g} of {cfg.cluster.gpu_peak_tflops:g} TFLOP/s)")
    if resume is not None:
        print(f"save and resume: losses of the stopped-and-resumed run {'equal' if resume['equal'] else 'DIFFER FROM'} "
              f"the uninterrupted run's ({resume['steps'][1]} vs {resume['steps'][0]} steps)")
    (args.out / "gpu_check.json").write_text(json.dumps({"stages": rows, "resume": resume,
                                                         "overrides": args.overrides}, indent=1))
    if resume is not None and not resume["equal"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
