"""The report's tables as numbers first, text second.

A `Table` keeps the raw values (what report.json holds and the tests check) and knows how to
format them and which cell is best, so Markdown and HTML show the same table by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

MISSING = "–"


# --------------------------------------------------------------------------- number formats


def fmt_ppl(x: float) -> str:
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}"


def fmt_pct(x: float) -> str:
    """Scores and shares are fractions in the data and percentages on the page."""
    return f"{100 * x:.1f}"


def fmt_count(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


def fmt_flops(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def fmt_hours(x: float) -> str:
    return f"{x:.3g}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}×"


def fmt_rank(x: float) -> str:
    return f"{x:.2f}"


def fmt_seconds(x: float) -> str:
    return f"{x:.1f}"


def fmt_plain(x) -> str:
    return str(x)


# --------------------------------------------------------------------------- the table model


@dataclass
class Column:
    key: str
    title: str
    fmt: Callable[[float], str]
    better: Optional[str] = None
    """`lower` or `higher`: the best cell is marked; None: no best."""


@dataclass
class Row:
    key: str
    label: str
    values: Dict[str, Optional[float]]
    marks: Dict[str, str] = field(default_factory=dict)
    """Footnote markers per column (e.g. † for a number taken from training, not eval)."""
    stderr: Dict[str, Optional[float]] = field(default_factory=dict)
    """Standard error per column, where the table gives one."""


@dataclass
class Table:
    key: str
    title: str
    columns: List[Column]
    rows: List[Row]
    notes: List[str] = field(default_factory=list)
    label_title: str = "Model"

    def best(self, col: Column) -> set:
        """Keys of the rows holding the best value of a column (ties all count)."""
        if col.better is None:
            return set()
        vals = [(r.key, r.values.get(col.key)) for r in self.rows]
        vals = [(k, v) for k, v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        if len({v for _, v in vals}) < 2:
            return set()  # one value, or all equal: nothing stands out
        pick = min if col.better == "lower" else max
        target = pick(v for _, v in vals)
        return {k for k, v in vals if v == target}

    def cells(self) -> List[List[tuple]]:
        """Per row, per column: (text, is_best)."""
        best = {c.key: self.best(c) for c in self.columns}
        out = []
        for r in self.rows:
            line = []
            for c in self.columns:
                v = r.values.get(c.key)
                text = MISSING if v is None else c.fmt(v) + r.marks.get(c.key, "")
                line.append((text, r.key in best[c.key]))
            out.append(line)
        return out

    def to_json(self) -> dict:
        return {"title": self.title,
                "columns": [{"key": c.key, "title": c.title, "better": c.better} for c in self.columns],
                "rows": [{"key": r.key, "label": r.label, "values": r.values,
                          **({"marks": r.marks} if r.marks else {}),
                          **({"stderr": r.stderr} if r.stderr else {})} for r in self.rows],
                "best": {c.key: sorted(self.best(c)) for c in self.columns if c.better},
                "notes": self.notes}


# --------------------------------------------------------------------------- the report's tables

TRAIN_MARK = "†"


def results_table(data: dict) -> Table:
    """Table 1: every model on every task and on every domain's held-out perplexity."""
    domains, tasks = data["domains"], data["tasks"]
    columns = [Column(t["key"], t["title"], fmt_pct, "higher") for t in tasks]
    columns += [Column(f"ppl:{d}", f"PPL {d}", fmt_ppl, "lower") for d in domains]
    rows = []
    for name, m in data["models"].items():
        values = {t["key"]: m["tasks"][t["key"]] for t in tasks}
        marks = {}
        for d in domains:
            p = m["perplexity"].get(d)
            values[f"ppl:{d}"] = p["value"] if p else None
            if p and p["source"] == "train":
                marks[f"ppl:{d}"] = TRAIN_MARK
        rows.append(Row(name, m["label"], values, marks))
    notes = ["Task scores in % (GSM8K exact match, HumanEval pass@1, MMLU accuracy); perplexity on "
             "each domain's held-out validation windows (lower is better). Best per column in bold."]
    if any(r.marks for r in rows):
        notes.append(f"{TRAIN_MARK} not evaluated: exp(validation loss) recorded at the end of training "
                     "(same held-out windows).")
    docs = _documents(data)
    if docs:
        notes.append("Documents per score: " + ", ".join(f"{t} {n}" for t, n in docs.items()) +
                     _noise_note(docs))
    return Table("results", "Table 1. Per-task results", columns, rows, notes)


def _documents(data: dict) -> Dict[str, str]:
    """Task title -> the number(s) of documents its scores rest on, over the evaluated models."""
    out = {}
    for t in data["tasks"]:
        ns = sorted({m["eval"]["documents"].get(t["key"]) for m in data["models"].values()
                     if m["eval"] and m["eval"]["documents"].get(t["key"])})
        if ns:
            out[t["title"]] = "/".join(map(str, ns))
    return out


def _noise_note(docs: Dict[str, str]) -> str:
    smallest = min(int(n) for v in docs.values() for n in v.split("/"))
    if smallest >= 1000:
        return "."
    # Binomial standard error at p = 0.5: how far apart two scores must be to mean anything.
    return (f" (with {smallest} documents one standard error is up to "
            f"{100 * math.sqrt(0.25 / smallest):.0f} points).")


def aggregate_table(data: dict, results: Table) -> Table:
    """Table 2: mean perplexity over domains, mean task score, mean rank over Table 1's columns."""
    domains, tasks = data["domains"], data["tasks"]
    ranks = _ranks(results)
    rows = []
    for r in results.rows:
        ppl = [r.values.get(f"ppl:{d}") for d in domains]
        scores = [r.values.get(t["key"]) for t in tasks]
        mine = ranks.get(r.key, [])
        rows.append(Row(r.key, r.label, {
            "mean_ppl": sum(ppl) / len(ppl) if ppl and None not in ppl else None,
            "mean_score": sum(scores) / len(scores) if scores and None not in scores else None,
            "mean_rank": sum(mine) / len(mine) if mine else None,
            "ranked_columns": float(len(mine)) if mine else None,
        }))
    columns = [Column("mean_ppl", "Mean PPL (domains)", fmt_ppl, "lower"),
               Column("mean_score", "Mean task score (%)", fmt_pct, "higher"),
               Column("mean_rank", "Mean rank", fmt_rank, "lower"),
               Column("ranked_columns", "Columns ranked", lambda x: f"{x:.0f}")]
    notes = [f"Mean PPL: arithmetic mean over {len(domains)} domains; mean task score over "
             f"{', '.join(t['title'] for t in tasks)}; both only where every value exists. Mean rank: "
             "each model's rank (1 = best) in every Table 1 column it has a value in, averaged."]
    return Table("aggregate", "Table 2. Aggregate", columns, rows, notes)


def score_se(p: float, n: int) -> float:
    """Standard error of a score that is the mean of n 0/1 outcomes (every task's headline
    metric), shrunk towards 1/2 (Agresti-Coull): 0 of 8 correct is not a score known to +-0."""
    p = (p * n + 1) / (n + 2)
    return math.sqrt(p * (1 - p) / n)


def mean_se(ses: List[Optional[float]]) -> Optional[float]:
    """Standard error of the mean of independent scores with these standard errors."""
    if not ses or None in ses:
        return None
    return math.sqrt(sum(se ** 2 for se in ses)) / len(ses)


SAME_MARK = "≈"


def domain_table(data: dict) -> Optional[Table]:
    """Table 2b (the BTX paper's Table 2): each domain's mean task score and their average, with
    standard errors; ≈ marks a score within two standard errors of its column's best. None when
    no task of the run belongs to the paper's suite."""
    from nemo_btx.evaluation.suite import PAPER

    by_domain = {d: [t for t in data["tasks"] if t.get("domain") == d] for d in PAPER}
    by_domain = {d: ts for d, ts in by_domain.items() if ts}
    if not by_domain:
        return None
    columns = [Column(f"domain:{d}", d.capitalize(), fmt_pct, "higher") for d in by_domain]
    columns.append(Column("average", "Average", fmt_pct, "higher"))
    rows = []
    for name, m in data["models"].items():
        values, ses = {}, {}
        for d, ts in by_domain.items():
            scores = [m["tasks"].get(t["key"]) for t in ts]
            docs = [m["eval"]["documents"].get(t["key"]) if m["eval"] else None for t in ts]
            ok = None not in scores and all(docs)
            values[f"domain:{d}"] = sum(scores) / len(scores) if ok else None
            ses[f"domain:{d}"] = mean_se([score_se(p, n) for p, n in zip(scores, docs)]) if ok else None
        domain_values = [values[f"domain:{d}"] for d in by_domain]
        values["average"] = sum(domain_values) / len(domain_values) if None not in domain_values else None
        ses["average"] = mean_se([ses[f"domain:{d}"] for d in by_domain])
        rows.append(Row(name, m["label"], values, stderr=ses))
    table = Table("domains", "Table 2b. By domain (the BTX paper's Table 2)", columns, rows)
    for col in columns:
        best = table.best(col)
        tops = [r for r in rows if r.key in best]
        for r in rows:
            v, se = r.values.get(col.key), r.stderr.get(col.key)
            if v is None or se is None:
                continue
            r.marks[col.key] = f" ± {100 * se:.1f}"
            if r.key not in best and tops and within_two_se(tops[0].values[col.key], tops[0].stderr[col.key], v, se):
                r.marks[col.key] += SAME_MARK
    table.notes = [
        "Mean task score in % per domain of the paper's suite (" + "; ".join(
            f"{d}: {', '.join(t['title'] for t in ts)}" for d, ts in by_domain.items()) + "), and "
        "their average (each domain counts once), ± one standard error (binomial per task, tasks "
        "independent). Best per column in bold; " + SAME_MARK + " within two standard errors of the "
        "best: not a meaningful difference."]
    return table


def within_two_se(a: float, se_a: Optional[float], b: float, se_b: Optional[float]) -> bool:
    """Whether two independent scores differ by less than two standard errors of the difference."""
    if se_a is None or se_b is None:
        return False
    return abs(a - b) < 2 * math.sqrt(se_a ** 2 + se_b ** 2)


def _ranks(table: Table) -> Dict[str, List[float]]:
    """Per row, its rank in every ranked column (ties share the mean rank)."""
    out: Dict[str, List[float]] = {}
    for c in table.columns:
        if c.better is None:
            continue
        vals = [(r.key, r.values.get(c.key)) for r in table.rows if r.values.get(c.key) is not None]
        if len(vals) < 2:
            continue
        sign = 1 if c.better == "lower" else -1
        ordered = sorted(v * sign for _, v in vals)
        for key, v in vals:
            first = ordered.index(v * sign) + 1
            ties = ordered.count(v * sign)
            out.setdefault(key, []).append(first + (ties - 1) / 2)
    return out


def compute_table(comp: Dict[str, dict]) -> Table:
    """Table 3: the cost of each method after the shared seed."""
    columns = [Column("tokens", "Tokens", fmt_count), Column("flops", "FLOPs", fmt_flops),
               Column("flops_vs_btx", "FLOPs vs BTX", fmt_ratio),
               Column("device_hours", "Device-hours", fmt_hours),
               Column("moe_share", "MoE-stage share (%)", fmt_pct),
               Column("parallel_share", "Parallelisable (%)", fmt_pct)]
    rows = [Row(key, row["label"], {c.key: row.get(c.key) if row["present"] else None for c in columns})
            for key, row in comp.items()]
    notes = ["Training after the shared seed (the seed row: the seed itself), from the last ledger "
             "line of each stage. MoE-stage share: FLOPs spent training an MoE; parallelisable: FLOPs "
             "spent in independent jobs with no communication between them (BTX's experts)."]
    incomplete = [f"{row['label']} (no ledger entry for {', '.join(row['missing'])})"
                  for row in comp.values() if row.get("missing")]
    if incomplete:
        notes.append("Incomplete: " + "; ".join(incomplete) + ".")
    return Table("compute", "Table 3. Compute", columns, rows, notes, label_title="Method")


def data_table(rows: List[dict]) -> Table:
    columns = [Column("train_documents", "Train docs", fmt_count), Column("train_tokens", "Train tokens", fmt_count),
               Column("valid_documents", "Valid docs", fmt_count), Column("valid_tokens", "Valid tokens", fmt_count),
               Column("bad_records", "Bad records skipped", fmt_plain)]
    table_rows = [Row(r["domain"], r["domain"] + (f" ({r['external']})" if r.get("external") else ""),
                      {c.key: r.get(c.key) for c in columns}) for r in rows]
    return Table("data", "Data per domain", columns, table_rows,
                 ["From each domain's data manifest (data/<domain>/manifest.json); tokens include one "
                  "end-of-document id per document."], label_title="Domain")


def ledger_table(stage_rows: List[dict]) -> Table:
    columns = [Column("steps", "Steps", fmt_plain), Column("tokens", "Tokens", fmt_count),
               Column("flops", "FLOPs", fmt_flops), Column("wall_s", "Wall s", fmt_seconds),
               Column("device_seconds", "Device-s", fmt_seconds),
               Column("world_size", "Ranks", fmt_plain)]
    rows = [Row(r["dir"], f"{r['stage']} ({r['dir']}, {r['device']})",
                {c.key: r.get(c.key) for c in columns}) for r in stage_rows]
    return Table("ledger", "Compute ledger by stage", columns, rows,
                 ["One row per output directory: its last ledger line (the stage's cumulative totals)."],
                 label_title="Stage")
