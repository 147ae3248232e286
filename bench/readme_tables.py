"""The README's measured tables, regenerated from a run's report.json instead of retyped.

    .venv/bin/python bench/readme_tables.py runs/tiny                 # a run directory
    .venv/bin/python bench/readme_tables.py runs/tiny/report/report.json

Prints, in the README's format (paste them over the old ones):

1. "The whole experiment": the report's Table 1 (task scores in %, held-out perplexity per
   domain) with Table 2's mean perplexity, one row per model, labelled with the steps each was
   trained (from the ledger), each expert's own domain in bold;
2. the numbers the text under that table quotes (expert vs seed, BTX vs the best expert, mean
   perplexities, routing shares, documents per task), from the report's findings;
3. "Branch and train": held-out loss (ln of Table 1's perplexity) of the seed and the experts.

Values and number formats are the report's own (report.json's tables, nemo_btx.reporting's
formatters); only the README's labels and layout are made here. Needs no torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from nemo_btx.reporting.tables import MISSING, fmt_ppl, fmt_pct


def load_report(path: Path) -> dict:
    """report.json from a run directory, its report/ directory, or the file itself."""
    path = Path(path)
    for candidate in (path, path / "report.json", path / "report" / "report.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise SystemExit(f"{path}: no report.json (run `nemo-btx report run.dir={path}` first)")


def _rows(report: dict, table: str) -> Dict[str, dict]:
    return {r["key"]: r for r in report["tables"][table]["rows"]}


def trained_steps(report: dict, name: str) -> Optional[int]:
    """Steps the model's own training stage ran (its last ledger line); None without one."""
    rel = report["models"].get(name, {}).get("train_dir")
    rows = [r for r in report.get("ledger", []) if rel and r.get("rel") == rel and r.get("steps")]
    if not rows:
        return None
    first, last = rows[-1]["steps"]
    return int(last) - int(first)


def _btx_details(report: dict, steps: Optional[int]) -> List[str]:
    mix, routing = report.get("mix") or {}, report.get("routing") or {}
    experts = mix.get("num_experts") or routing.get("num_experts")
    out = []
    if experts:
        out.append(f"{experts} experts" + (" incl. seed" if mix.get("include_seed") else ""))
    kind = ((report.get("config") or {}).get("finetune") or {}).get("routing", "topk")
    if kind != "topk":
        out.append(kind)
    elif routing.get("router_topk"):
        out.append(f"top-{routing['router_topk']}")
    if steps is not None:
        out.append(f"{steps} steps")
    return out


def readme_label(report: dict, name: str) -> str:
    """The README's row label: what the model is and how long it trained."""
    n = trained_steps(report, name)
    domains = report["domains"]

    def with_steps(text: str, fmt: str) -> str:
        return text if n is None else f"{text} ({fmt.format(n=n)})"

    if name == "seed":
        return with_steps("seed", "{n} steps")
    if name.startswith("expert-") and name[len("expert-"):] in domains:
        return with_steps(f"expert: {name[len('expert-'):]}", "+{n}")
    if name == "upcycle-data":
        return with_steps("upcycling, data-matched", "{n} MoE steps")
    if name == "upcycle-compute":
        return with_steps("upcycling, compute-matched", "{n}")
    if name == "dense":
        return with_steps("dense, compute-matched", "{n}")
    if name == "btx":
        details = _btx_details(report, n)
        return "**BTX**" + (f" ({', '.join(details)})" if details else "")
    return report["models"].get(name, {}).get("label", name)  # BTM top-1/top-2, anything new


def _own_domain(name: str, domains: List[str]) -> Optional[str]:
    d = name[len("expert-"):] if name.startswith("expert-") else None
    return d if d in domains else None


def _markdown(head: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def table1(report: dict) -> str:
    """README "The whole experiment": Table 1 of the report plus Table 2's mean perplexity."""
    domains, tasks = report["domains"], report["tasks"]
    mean = _rows(report, "aggregate")
    head = ["model"] + [t["title"] for t in tasks] + [f"ppl {d}" for d in domains] + ["mean ppl"]
    rows = []
    for row in report["tables"]["results"]["rows"]:
        v, own = row["values"], _own_domain(row["key"], domains)
        cells = [readme_label(report, row["key"])]
        cells += [MISSING if v.get(t["key"]) is None else fmt_pct(v[t["key"]]) for t in tasks]
        for d in domains:
            p = v.get(f"ppl:{d}")
            text = MISSING if p is None else fmt_ppl(p)
            cells.append(f"**{text}**" if d == own and p is not None else text)
        m = mean.get(row["key"], {}).get("values", {}).get("mean_ppl")
        cells.append(MISSING if m is None else fmt_ppl(m))
        rows.append(cells)
    return _markdown(head, rows)


def _pct(x: float) -> str:
    return f"{x:+.0f} %".replace("-", "−")


def quoted_numbers(report: dict) -> List[str]:
    """The figures the README's text under Table 1 quotes, from the report's findings."""
    found = {f["id"]: f["values"] for f in report.get("findings", [])}
    domains = report["domains"]
    out = []

    def per_domain(prefix: str, key: str, fmt) -> Optional[str]:
        vals = [found.get(f"{prefix}:{d}", {}).get(key) for d in domains]
        return None if None in vals else ", ".join(fmt(x) for x in vals)

    line = per_domain("expert_beats_seed", "gap_pct", _pct)
    if line:
        out.append(f"each expert against the seed on its own domain ({'/'.join(domains)}): {line}")
    line = per_domain("btx_vs_best_expert", "gap_pct", _pct)
    if line:
        out.append(f"BTX against the best expert per domain: {line}")
    means = {k.split(":")[1]: v for k, v in found.items() if k.startswith("btx_vs:") and k.endswith(":ppl")}
    if means:
        btx = next(iter(means.values()))["btx"]
        out.append(f"mean perplexity: BTX {btx:.0f}; " +
                   ", ".join(f"{report['models'].get(name, {}).get('label', name)} {v['other']:.0f}"
                             for name, v in means.items()))
    line = per_domain("routing_own_expert", "share", lambda x: f"{100 * x:.0f} %")
    if line:
        k = (report.get("routing") or {}).get("router_topk")
        n = (report.get("routing") or {}).get("num_experts")
        uniform = f" (uniform {100 / n:.0f} %)" if n else ""
        out.append(f"BTX routes to the domain's own expert ({'/'.join(domains)}, top-{k} assignments): "
                   f"{line}{uniform}")
    docs = (report["models"].get("btx") or {}).get("documents") or {}
    if docs:
        titles = {t["key"]: t["title"] for t in report["tasks"]}
        out.append("documents per task: " + ", ".join(f"{titles.get(k, k)} {n}" for k, n in docs.items()))
    return out


def branch_train_table(report: dict) -> str:
    """README "Branch and train": held-out loss of the seed and each expert (ln perplexity)."""
    domains = report["domains"]
    rows = []
    for row in report["tables"]["results"]["rows"]:
        name = row["key"]
        own = _own_domain(name, domains)
        if name != "seed" and own is None:
            continue
        cells = ["seed" if name == "seed" else f"expert: {own}"]
        for d in domains:
            p = row["values"].get(f"ppl:{d}")
            text = MISSING if p is None else f"{math.log(p):.3f}"
            cells.append(f"**{text}**" if d == own and p is not None else text)
        rows.append(cells)
    return _markdown(["model", *domains], rows)


def render(report: dict) -> str:
    parts = ["<!-- README \"The whole experiment\": the report's Table 1 -->", table1(report), "",
             "<!-- numbers quoted in the text under it -->"]
    parts += [f"- {line}" for line in quoted_numbers(report)]
    parts += ["", "<!-- README \"Branch and train\": validation loss, lower is better -->",
              branch_train_table(report), ""]
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="a run directory or its report.json")
    args = ap.parse_args(argv)
    sys.stdout.write(render(load_report(args.report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
