"""report.html: one self-contained page (inline CSS, figures as base64 data URIs, no scripts).

A single file can be mailed, attached to a ticket or opened from a cluster's scratch space
without the PNGs next to it and without network access.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import List

from nemo_btx.reporting import document as doc
from nemo_btx.reporting.tables import Table

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1180px; padding: 24px 32px 64px; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.8em; margin-bottom: .3em; }
h3 { font-size: 1.05em; margin: 1.1em 0 .2em; }
h2 { font-size: 1.35em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .4em 0 .3em; font-size: .9em; }
caption { text-align: left; font-weight: 600; padding: .3em 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: 700; background: #eaf6ea; }
tr:nth-child(even) td:not(.best) { background: #fafbfc; }
p.note { font-size: .82em; color: #555; margin: .15em 0; max-width: 60em; }
ul.findings { list-style: none; padding-left: 0; }
ul.findings li { margin: .25em 0; padding-left: 1.6em; text-indent: -1.6em; }
.ok { color: #1a7f37; font-weight: 700; } .no { color: #cf222e; font-weight: 700; }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; font-size: .92em; }
dl.kv dt { font-weight: 600; } dl.kv dd { margin: 0; font-family: ui-monospace, monospace; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
details { margin: 1em 0; } summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: .82em; }
"""

MARKS = {True: '<span class="ok">✓</span> ', False: '<span class="no">✗</span> ', None: ""}


def table(t: Table) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in [t.label_title] + [c.title for c in t.columns])
    body = []
    for row, cells in zip(t.rows, t.cells()):
        tds = "".join(f'<td class="num{" best" if best else ""}">{"<strong>" if best else ""}{escape(x)}'
                      f'{"</strong>" if best else ""}</td>' for x, best in cells)
        body.append(f'<tr data-row="{escape(row.key)}"><td>{escape(row.label)}</td>{tds}</tr>')
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in t.notes)
    return (f'<table id="table-{escape(t.key)}"><caption>{escape(t.title)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{notes}")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render(blocks: List[doc.Block], image_dir: Path, title: str = "BTX experiment report") -> str:
    """The page; `image_dir` holds the PNGs the Image blocks name (they are embedded)."""
    out: List[str] = []
    for b in blocks:
        if isinstance(b, doc.Heading):
            out.append(f"<h{b.level}>{escape(b.text)}</h{b.level}>")
        elif isinstance(b, doc.Paragraph):
            out.append(f"<p>{escape(b.text)}</p>")
        elif isinstance(b, doc.Bullets):
            items = "".join(f"<li>{MARKS[h]}{escape(t)}</li>" for h, t in b.items)
            marked = any(h is not None for h, _ in b.items)
            out.append(('<ul class="findings">' if marked else "<ul>") + items + "</ul>")
        elif isinstance(b, doc.KeyValues):
            items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in b.items)
            out.append(f'<dl class="kv">{items}</dl>')
        elif isinstance(b, doc.TableBlock):
            out.append(table(b.table))
        elif isinstance(b, doc.Image):
            out.append(f'<figure><img src="{data_uri(Path(image_dir) / b.file)}" alt="{escape(b.caption)}">'
                       f"<figcaption>{escape(b.caption)}</figcaption></figure>")
        elif isinstance(b, doc.Code):
            out.append(f"<details><summary>{escape(b.title)}</summary><pre><code>{escape(b.text)}"
                       "</code></pre></details>")
        else:  # pragma: no cover - a new block type must be rendered here
            raise TypeError(f"unknown block {type(b).__name__}")
    body = "\n".join(out)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
