"""Compute budgets from the ledger: what BTX spent, and how many steps a baseline may take.

The paper compares BTX with baselines at equal compute: sparse upcycling gets all the FLOPs
BTX spent on its experts plus its MoE finetune, in the MoE stage; the dense model gets the same
budget as continued training. Every training segment appends its tokens and FLOPs (by formula)
to <run.dir>/ledger.jsonl, so budgets are sums over that file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from nemo_btx.config.schema import ModelConfig
from nemo_btx.errors import BtxError
from nemo_btx.planner.flops import model_flops_per_token
from nemo_btx.run_dir import RunDir


def read_ledger(run_dir: Path) -> List[dict]:
    path = RunDir(run_dir).ledger
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_totals(run_dir: Path) -> List[dict]:
    """One entry per trained output directory: its last ledger line, which holds the stage's
    cumulative totals. A stage resumed after a kill (or finished twice) thus counts once."""
    last = {}
    for entry in read_ledger(run_dir):
        last[str(out_dir(entry, run_dir))] = entry
    return list(last.values())


def out_dir(entry: dict, run_dir: Path) -> Path:
    """A ledger line's output directory (written relative to the run directory when inside it)."""
    out = Path(entry["out"])
    return (out if out.is_absolute() else Path(run_dir) / out).resolve()


def _under(path: str, root: Path) -> bool:
    p, r = Path(path).resolve(), root.resolve()
    return p == r or r in p.parents


def btx_flops(run_dir: Path) -> float:
    """FLOPs of the BTX-specific training: every expert plus the MoE finetune (not the seed,
    which all methods share)."""
    rd = RunDir(run_dir)
    entries = stage_totals(rd.root)
    experts = [e for e in entries if _under(out_dir(e, rd.root), rd.experts)]
    finetune = [e for e in entries if _under(out_dir(e, rd.root), rd.finetuned)]
    if not experts or not finetune:
        raise BtxError(f"{rd.ledger}: no expert or BTX finetune entries; train the "
                       "experts and run `nemo-btx finetune` before the compute-matched baselines")
    return sum(e["flops"] for e in experts + finetune)


def steps_for_flops(flops: float, model: ModelConfig, tokens_per_step: int) -> int:
    """Optimizer steps of `model` that spend `flops` (at least one)."""
    return max(1, round(flops / (model_flops_per_token(model) * tokens_per_step)))
