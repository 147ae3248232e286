"""report.md: the document as GitHub-flavoured Markdown, figures as relative PNG links."""

from __future__ import annotations

from typing import List

from nemo_btx.reporting import document as doc
from nemo_btx.reporting.tables import Table

MARKS = {True: "✓ ", False: "✗ ", None: ""}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(t: Table) -> List[str]:
    head = [t.label_title] + [c.title for c in t.columns]
    lines = [f"**{t.title}**", "", "| " + " | ".join(map(_cell, head)) + " |",
             "|:---|" + "---:|" * len(t.columns)]
    for row, cells in zip(t.rows, t.cells()):
        texts = [f"**{_cell(x)}**" if best else _cell(x) for x, best in cells]
        lines.append("| " + " | ".join([_cell(row.label)] + texts) + " |")
    lines.append("")
    lines += [f"*{n}*  " for n in t.notes]
    return lines


def render(blocks: List[doc.Block]) -> str:
    out: List[str] = []
    for b in blocks:
        if isinstance(b, doc.Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, doc.Paragraph):
            out += [b.text, ""]
        elif isinstance(b, doc.Bullets):
            out += [f"- {MARKS[holds]}{text}" for holds, text in b.items] + [""]
        elif isinstance(b, doc.KeyValues):
            out += [f"- **{k}:** {v}" for k, v in b.items] + [""]
        elif isinstance(b, doc.TableBlock):
            out += table(b.table) + [""]
        elif isinstance(b, doc.Image):
            out += [f"![{b.caption}]({b.file})", "", f"*{b.caption}*", ""]
        elif isinstance(b, doc.Code):
            fence = "````" if "```" in b.text else "```"
            out += [f"**{b.title}**", "", fence + b.lang, b.text.rstrip("\n"), fence, ""]
        else:  # pragma: no cover - a new block type must be rendered here
            raise TypeError(f"unknown block {type(b).__name__}")
    return "\n".join(out).rstrip("\n") + "\n"
