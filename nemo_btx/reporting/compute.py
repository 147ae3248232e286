"""What each method cost, from the compute ledger: the paper's Table 3 on this run.

The seed is shared by every method, so a method's cost is its training after the seed (the
seed row shows the seed itself). Shares are by FLOPs (a formula, the same on every device)
rather than device-seconds, which depend on the hardware each stage happened to run on.
"""

from __future__ import annotations

from typing import Dict, List

from nemo_btx.run_dir import BASELINES

#: method -> (label, ledger categories it spent, categories that ran as independent jobs,
#: categories trained as an MoE).
#: A baseline's category is its name (nemo_btx/run_dir.py).
METHODS = [
    ("seed", "Seed", ("seed",), (), ()),
    ("btx", "BTX (experts + MoE finetune)", ("expert", "finetune"), ("expert",), ("finetune",)),
    ("btm", "BTM (experts only)", ("expert",), ("expert",), ()),
    *[(b.name, b.label, (b.name,), (), (b.name,) if b.moe else ()) for b in BASELINES],
]


def _sum(entries: List[dict], key: str) -> float:
    return float(sum(e.get(key) or 0 for e in entries))


def compute_table(entries: List[dict], domains: List[str]) -> Dict[str, dict]:
    """method -> tokens, FLOPs, device-hours, MoE-stage share, parallelisable share, FLOPs
    relative to BTX; None values where the ledger lacks the method's stages."""
    by_cat: Dict[str, List[dict]] = {}
    for e in entries:
        by_cat.setdefault(e["category"], []).append(e)
    experts_seen = {e["rel"].split("/", 1)[1] for e in by_cat.get("expert", [])}
    out: Dict[str, dict] = {}
    for key, label, cats, parallel, moe in METHODS:
        parts = [e for c in cats for e in by_cat.get(c, [])]
        absent = [c for c in cats if not by_cat.get(c)]
        if "expert" in cats:
            absent += [f"expert {d}" for d in domains if d not in experts_seen]
        if not parts:
            out[key] = {"label": label, "present": False, "missing": absent, "stages": []}
            continue
        flops = _sum(parts, "flops")
        par = _sum([e for e in parts if e["category"] in parallel], "flops")
        moe_flops = _sum([e for e in parts if e["category"] in moe], "flops")
        walls = {c: [float(e.get("wall_s") or 0) for e in parts if e["category"] == c] for c in cats}
        out[key] = {
            "label": label, "present": True, "complete": not absent, "missing": absent,
            "stages": [e["rel"] or e["out"] for e in parts],
            "tokens": _sum(parts, "tokens"), "flops": flops,
            "device_seconds": _sum(parts, "device_seconds"),
            "device_hours": _sum(parts, "device_seconds") / 3600.0,
            "wall_s": _sum(parts, "wall_s"),
            # Wall time if every independent job ran at once: the longest of them plus the rest.
            "critical_path_wall_s": sum(max(w) if c in parallel else sum(w)
                                        for c, w in walls.items() if w),
            "moe_share": moe_flops / flops if flops else None,
            "parallel_share": par / flops if flops else None,
        }
    btx = out["btx"].get("flops") if out["btx"]["present"] else None
    for row in out.values():
        row["flops_vs_btx"] = row["flops"] / btx if row["present"] and btx else None
    return out


def stage_rows(entries: List[dict]) -> List[dict]:
    """The ledger itself (last line per output directory), for the detail table."""
    return [{"stage": e.get("stage"), "dir": e["rel"] or e.get("out"), "category": e["category"],
             "steps": (e.get("steps") or [None, None])[-1], "tokens": e.get("tokens"),
             "flops": e.get("flops"), "wall_s": e.get("wall_s"), "device_seconds": e.get("device_seconds"),
             "world_size": e.get("world_size"), "device": e.get("device")} for e in entries]

