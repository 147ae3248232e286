"""The report's conclusions, computed from its tables so they can never contradict them.

Each finding states a claim the BTX paper makes (experts beat the seed on their domain, BTX
comes close to the experts and beats the baselines, ...) together with whether it holds on this
run and the numbers that decide it. A claim that fails is reported as failing, with the numbers.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from nemo_btx.reporting.tables import Table, fmt_pct, fmt_ppl, fmt_ratio, mean_se, score_se
from nemo_btx.run_dir import BASELINES

#: Compute-matched baselines count as matched within this relative FLOP difference.
MATCH_TOLERANCE = 0.10


def _rel(a: float, b: float) -> float:
    """a relative to b, in %."""
    return 100.0 * (a - b) / b


def _signed(x: float, unit: str = " %") -> str:
    return f"{x:+.1f}".replace("-", "−") + unit


#: Finding groups in the order the report shows them (the id's prefix decides the group).
GROUPS = {"expert_beats_seed": "Experts against the seed",
          "btx_vs_best_expert": "BTX against the best expert per domain",
          "btx_vs": "BTX against the seed and the baselines",
          "compute_matched": "Compute", "btx_parallel": "Compute",
          "routing_own_expert": "Routing"}


def _finding(fid: str, holds: bool, text: str, **values) -> dict:
    return {"id": fid, "group": GROUPS[fid.split(":")[0]], "holds": bool(holds), "text": text,
            "values": values}


def _verb(better: bool, tie: bool) -> str:
    return "ties with" if tie else ("beats" if better else "does not beat")


def _score_se(data: dict, name: str) -> Optional[float]:
    """Standard error of a model's mean task score (binomial per task, independent tasks)."""
    m = data["models"][name]
    if not m["eval"]:
        return None
    ses = []
    for t in data["tasks"]:
        p, n = m["tasks"].get(t["key"]), m["eval"]["documents"].get(t["key"])
        if p is None or not n:
            return None
        ses.append(score_se(p, n))
    return mean_se(ses)


def findings(data: dict, results: Table, aggregate: Table, comp: Dict[str, dict]) -> Tuple[List[dict], List[str]]:
    """(findings, claims that could not be assessed and why)."""
    val = {r.key: r.values for r in results.rows}
    agg = {r.key: r.values for r in aggregate.rows}
    labels = {r.key: r.label for r in results.rows}
    out: List[dict] = []
    skipped: List[str] = []
    domains = data["domains"]

    # 1. Each expert beats the seed on its own domain (a general domain has no expert).
    for d in data.get("experts", domains):
        e, s = val.get(f"expert-{d}", {}).get(f"ppl:{d}"), val.get("seed", {}).get(f"ppl:{d}")
        if e is None or s is None:
            skipped.append(f"expert {d} vs seed on {d}: perplexity missing")
            continue
        verb = _verb(e < s, e == s)
        out.append(_finding(f"expert_beats_seed:{d}", e < s,
                            f"Expert {d} {verb} the seed on {d}: perplexity {fmt_ppl(e)} vs "
                            f"{fmt_ppl(s)} ({_signed(_rel(e, s))}).", expert=e, seed=s, gap_pct=_rel(e, s)))

    # 2. BTX against the best expert on each domain.
    for d in domains:
        b = val.get("btx", {}).get(f"ppl:{d}")
        experts = [(val[f"expert-{x}"][f"ppl:{d}"], x) for x in domains
                   if val.get(f"expert-{x}", {}).get(f"ppl:{d}") is not None]
        if b is None or not experts:
            skipped.append(f"BTX vs the best expert on {d}: perplexity missing")
            continue
        best, who = min(experts)
        gap = _rel(b, best)
        where = "below" if gap < 0 else "above"
        out.append(_finding(f"btx_vs_best_expert:{d}", b <= best,
                            f"On {d}, BTX's perplexity {fmt_ppl(b)} is {abs(gap):.1f} % {where} the best "
                            f"expert's (expert {who}, {fmt_ppl(best)}).",
                            btx=b, best_expert=best, expert=who, gap_pct=gap))

    # 3. and 4. BTX against the seed and every baseline, on average.
    for other in [n for n in data["models"] if n != "btx" and not n.startswith("expert-")]:
        if other not in agg:
            continue
        b, o = agg.get("btx", {}).get("mean_ppl"), agg[other].get("mean_ppl")
        if b is None or o is None:
            skipped.append(f"BTX vs {labels[other]} on mean perplexity: a domain's perplexity is missing")
        else:
            verb = _verb(b < o, b == o)
            out.append(_finding(f"btx_vs:{other}:ppl", b < o,
                                f"BTX {verb} {labels[other]} on mean perplexity: {fmt_ppl(b)} vs "
                                f"{fmt_ppl(o)} ({_signed(_rel(b, o))}).", btx=b, other=o, gap_pct=_rel(b, o)))
        b, o = agg.get("btx", {}).get("mean_score"), agg[other].get("mean_score")
        if b is None or o is None:
            skipped.append(f"BTX vs {labels[other]} on mean task score: a task score is missing")
            continue
        verb = _verb(b > o, b == o)
        text = (f"BTX {verb} {labels[other]} on mean task score: {fmt_pct(b)} % vs {fmt_pct(o)} % "
                f"({_signed(100 * (b - o), ' points')})")
        se_b, se_o = _score_se(data, "btx"), _score_se(data, other)
        se = math.sqrt(se_b ** 2 + se_o ** 2) if se_b is not None and se_o is not None else None
        if se is not None and abs(b - o) < 2 * se:  # the rule Table 2b's ≈ marks use
            text += (f"; within two standard errors (2 × {100 * se:.1f} points), so not a "
                     "meaningful difference")
        out.append(_finding(f"btx_vs:{other}:tasks", b > o, text + ".", btx=b, other=o,
                            diff=b - o, stderr=se))

    # Compute matching: the baselines the paper compares at equal compute really had it.
    for key in [b.name for b in BASELINES if b.matched == "compute"]:
        ratio = (comp.get(key) or {}).get("flops_vs_btx")
        if ratio is None:
            skipped.append(f"{key} compute matching: ledger entries missing")
            continue
        ok = abs(ratio - 1) <= MATCH_TOLERANCE
        out.append(_finding(f"compute_matched:{key}", ok,
                            f"{comp[key]['label']} spent {fmt_ratio(ratio)} BTX's training FLOPs "
                            f"({'matched' if ok else 'not matched'} within ±{MATCH_TOLERANCE:.0%}).",
                            ratio=ratio))
    btx = comp.get("btx") or {}
    if btx.get("parallel_share") is not None:
        out.append(_finding("btx_parallel", btx["parallel_share"] > 0.5,
                            f"{fmt_pct(btx['parallel_share'])} % of BTX's training FLOPs ran as "
                            f"independent expert jobs; {fmt_pct(btx['moe_share'])} % in the MoE finetune.",
                            parallel_share=btx["parallel_share"], moe_share=btx["moe_share"]))

    out += _routing_findings(data, skipped)
    return out, skipped


def _routing_findings(data: dict, skipped: List[str]) -> List[dict]:
    """Does each domain's expert receive more than a uniform share of that domain's tokens?"""
    r = data.get("routing")
    if not r:
        skipped.append("routing specialisation: btx/finetuned/routing.json missing")
        return []
    out = []
    uniform = 1.0 / r["num_experts"]
    for d in r["domains"]:
        own = [i for i, name in enumerate(r["experts"]) if name.split("#")[0] == d]
        by_layer = r["fractions"].get(d) or {}
        if not own or not by_layer:
            continue
        share = sum(sum(s[i] for i in own) for s in by_layer.values()) / len(by_layer)
        out.append(_finding(f"routing_own_expert:{d}", share > uniform * len(own),
                            f"BTX sends {fmt_pct(share)} % of {d} tokens' top-{r['router_topk']} "
                            f"assignments to the {d} expert on average over {len(by_layer)} layers "
                            f"(uniform: {fmt_pct(uniform * len(own))} %).",
                            share=share, uniform=uniform * len(own)))
    return out
