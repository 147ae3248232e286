"""bench/readme_tables.py prints the README's measured tables from a run's report.json: the
same values as the report's Table 1 (and Table 2's mean perplexity) in the README's layout."""

import math
import re
import sys

import pytest

from conftest import REPO
from report_run import DOMAINS, LOSS, SCORES, STEPS, make_run

from nemo_btx.reporting.tables import fmt_pct, fmt_ppl
from nemo_btx.stages.report import build_report

sys.path.insert(0, str(REPO / "bench"))
import readme_tables  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("readme") / "run")
    build_report(run)
    return run


def _table(text: str, header_start: str):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[0], rows[1], rows[2:]


def test_table1_equals_the_report(run, capsys):
    assert readme_tables.main([str(run)]) == 0
    out = capsys.readouterr().out
    head, sep, rows = _table(out, "| model | GSM8K")
    assert head == ["model", "GSM8K", "HumanEval", "MMLU", "ppl code", "ppl math", "ppl wiki", "mean ppl"]
    assert sep == ["---"] * len(head)
    labels = [r[0] for r in rows]
    assert labels == [
        f"seed ({STEPS['seed']} steps)",
        *[f"expert: {d} (+{STEPS['expert-' + d]})" for d in DOMAINS],
        "BTM top-1", "BTM top-2",
        f"upcycling, data-matched ({STEPS['upcycle-data']} MoE steps)",
        f"upcycling, compute-matched ({STEPS['upcycle-compute']})",
        f"dense, compute-matched ({STEPS['dense']})",
        f"**BTX** (4 experts incl. seed, top-2, {STEPS['btx']} steps)"]
    names = list(SCORES)  # the report's row order
    for name, cells in zip(names, rows):
        scores = [fmt_pct(x) for x in SCORES[name]]
        ppl = [fmt_ppl(math.exp(LOSS[name][d])) for d in DOMAINS]
        own = name[len("expert-"):] if name.startswith("expert-") else None
        ppl = [f"**{p}**" if d == own else p for p, d in zip(ppl, DOMAINS)]
        mean = fmt_ppl(sum(math.exp(LOSS[name][d]) for d in DOMAINS) / len(DOMAINS))
        assert cells[1:] == scores + ppl + [mean], name

    # The Branch-and-Train table: held-out loss of the seed and the experts.
    head, _, rows = _table(out, "| model | code")
    assert head == ["model", *DOMAINS]
    assert [r[0] for r in rows] == ["seed", *[f"expert: {d}" for d in DOMAINS]]
    assert rows[1][1:] == ["**4.000**", "4.500", "6.800"]
    assert rows[0][1:] == [f"{LOSS['seed'][d]:.3f}" for d in DOMAINS]
    # The text's numbers come from the report's findings.
    assert "- each expert against the seed on its own domain (code/math/wiki): −63 %, −78 %, +11 %" in out
    assert "(code/math/wiki, top-2 assignments): 45 %, 55 %, 20 % (uniform 25 %)" in out


def test_readme_has_the_same_layout(run):
    """The README's table is what the script prints (numbers aside), so it can be pasted over."""
    ours = readme_tables.table1(readme_tables.load_report(run / "report" / "report.json"))
    readme = (REPO / "README.md").read_text()
    r_head, r_sep, r_rows = _table(readme, "| model | GSM8K")
    o_head, o_sep, o_rows = _table(ours, "| model | GSM8K")
    assert (r_head, r_sep) == (o_head, o_sep)

    def shape(label):
        return re.sub(r"\d+", "N", label)

    assert [shape(r[0]) for r in r_rows] == [shape(r[0]) for r in o_rows]
    assert [[c.startswith("**") for c in r] for r in r_rows] == [[c.startswith("**") for c in r] for r in o_rows]


def test_missing_values_and_inputs(run, tmp_path):
    report = readme_tables.load_report(run)
    report["tables"]["results"]["rows"][0]["values"]["ppl:code"] = None
    report["ledger"] = []
    text = readme_tables.table1(report)
    assert "| seed | 2.0 | 0.0 | 25.0 | – |" in text
    with pytest.raises(SystemExit, match="no report.json"):
        readme_tables.load_report(tmp_path)
