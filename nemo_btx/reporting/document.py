"""The report as a list of blocks (headings, tables, figures, ...), independent of its format.

report.md and report.html are two renderings of this one list, so they cannot drift apart:
a section added here appears in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from nemo_btx.reporting.tables import Table


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: List[Tuple[Optional[bool], str]]
    """(holds, text): True/False are shown as ✓/✗, None as a plain bullet."""


@dataclass
class TableBlock:
    table: Table


@dataclass
class Image:
    file: str
    caption: str


@dataclass
class KeyValues:
    items: List[Tuple[str, str]]


@dataclass
class Code:
    text: str
    title: str
    lang: str = "yaml"


Block = Union[Heading, Paragraph, Bullets, TableBlock, Image, KeyValues, Code]


def build(data: dict, tables: Dict[str, Table], found: List[dict], skipped: List[str],
          figures: Dict[str, str]) -> List[Block]:
    """The whole report, top to bottom: what was found, the evidence, then how to reproduce it."""
    r, mix = data.get("routing"), data.get("mix") or {}
    held = sum(f["holds"] for f in found)
    experts = ", ".join(r["experts"]) if r else (str(mix.get("num_experts")) if mix else "–")
    blocks: List[Block] = [
        Heading("BTX experiment report", 1),
        KeyValues([("Run directory", data["run_dir"]), ("Generated", data["generated"]),
                   ("Domains", ", ".join(data["domains"]) or "–"),
                   ("BTX experts", experts + (f" (top-{r['router_topk']} routing)" if r else "")),
                   ("Models compared", str(len(data["models"]))),
                   ("Missing inputs", str(len(data["missing"])))]),
        Heading("Findings"),
        Paragraph(f"{held} of {len(found)} checked claims hold on this run (✓ holds, ✗ does not). "
                  "Every sentence is computed from the tables below."),
    ]
    for group in dict.fromkeys(f["group"] for f in found):
        blocks += [Heading(group, 3), Bullets([(f["holds"], f["text"]) for f in found if f["group"] == group])]
    if skipped:
        blocks += [Heading("Not assessed (inputs missing)", 3), Bullets([(None, s) for s in skipped])]

    blocks += [Heading("Results"), TableBlock(tables["results"]), TableBlock(tables["aggregate"])]
    if "domains" in tables:
        blocks.append(TableBlock(tables["domains"]))
    if "scores.png" in figures:
        blocks.append(Image("scores.png", figures["scores.png"]))

    blocks += [Heading("Compute"), TableBlock(tables["compute"]), TableBlock(tables["ledger"])]
    if "data" in tables:
        blocks += [Heading("Data"), TableBlock(tables["data"])]

    blocks.append(Heading("Training"))
    for name in ("loss_curves.png", "valid_curves.png"):
        if name in figures:
            blocks.append(Image(name, figures[name]))
    if not any(n in figures for n in ("loss_curves.png", "valid_curves.png")):
        blocks.append(Paragraph("No metrics.jsonl in any training stage yet."))

    blocks.append(Heading("Routing"))
    if "routing.png" in figures:
        blocks.append(Image("routing.png", figures["routing.png"]))
    else:
        blocks.append(Paragraph("No routing analysis (btx/finetuned/routing.json) yet."))

    blocks.append(Heading("Missing inputs"))
    blocks.append(Bullets([(None, m) for m in data["missing"]]) if data["missing"]
                  else Paragraph("None: every expected input was found."))

    v = data["versions"]
    blocks += [Heading("Reproducibility"),
               KeyValues([("Run directory", data["run_dir"]), ("Generated", data["generated"]),
                          ("Config", data["config"]["source"] or "–")]
                         + [(pkg, ver) for pkg, ver in sorted(v["packages"].items())]
                         + [("Report written with", ", ".join(f"{k} {x}" for k, x in
                                                             sorted(data.get("reporter", {}).items())))])]
    if v["differ"]:
        blocks.append(Paragraph("Versions differ between stages: " + "; ".join(
            f"{pkg}: " + ", ".join(f"{src} {ver}" for src, ver in by.items()) for pkg, by in v["differ"].items())))
    if data["config"]["text"]:
        blocks.append(Code(data["config"]["text"], f"Resolved config ({data['config']['source']})"))
    return blocks
