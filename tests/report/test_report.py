"""The comparison report: its numbers equal the run directory's, it survives missing inputs and
failed builds, and its HTML renders with every figure in a real headless browser."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env, missing_system_package
from report_run import (DATA_DOCS, DOCS, DOMAINS, FLOPS_PER_TOKEN, LOSS, ROUTING, SCORES, STEPS, TOKENS_PER_STEP,
                        TRAIN_OFFSET, make_run)

from nemo_btx.reporting import plots
from nemo_btx.stages.report import build_report

FIGURES = {"loss_curves.png", "valid_curves.png", "routing.png", "scores.png"}


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path / "run")


def _row(report, table, key):
    rows = {r["key"]: r for r in report["tables"][table]["rows"]}
    return rows[key]["values"]


def _table_line(md: str, label: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {label} |"))


def test_numbers_equal_the_run_directory(run):
    report = build_report(run)
    out = run / "report"
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "report.json"} | FIGURES
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["tables"] == json.loads(json.dumps(report["tables"]))

    # Table 1: task scores are lm-eval's headline metrics, perplexities the eval stage's.
    for name, (gsm, he, mmlu) in SCORES.items():
        row = _row(on_disk, "results", name)
        assert (row["gsm8k"], row["humaneval"], row["mmlu"]) == (gsm, he, mmlu), name
        for d in DOMAINS:
            assert row[f"ppl:{d}"] == pytest.approx(math.exp(LOSS[name][d]), rel=1e-12), (name, d)
            assert on_disk["models"][name]["perplexity"][d]["source"] == "eval"
    assert on_disk["models"]["btx"]["documents"] == {"gsm8k": DOCS, "humaneval": DOCS, "mmlu": 3 * DOCS}
    # Best per column: the math expert on GSM8K, the code expert on HumanEval, dense on wiki.
    best = on_disk["tables"]["results"]["best"]
    assert best["gsm8k"] == ["expert-math"] and best["humaneval"] == ["expert-code"]
    assert best["mmlu"] == ["expert-wiki"] and best["ppl:wiki"] == ["dense"]
    md = (out / "report.md").read_text()
    assert _table_line(md, "Expert: math").split(" | ")[1] == "**20.0**"
    assert _table_line(md, "BTX").split(" | ")[1:4] == ["18.0", "8.0", "29.0"]
    assert _table_line(md, "Dense (compute-matched)").split(" | ")[6] == f"**{math.exp(5.6):.1f}** |"

    # Table 2: mean perplexity over domains and mean task score.
    agg = _row(on_disk, "aggregate", "seed")
    assert agg["mean_ppl"] == pytest.approx(sum(math.exp(LOSS["seed"][d]) for d in DOMAINS) / 3)
    assert agg["mean_score"] == pytest.approx(sum(SCORES["seed"]) / 3)

    # Table 3 from the ledger, last line per `out`: the math expert's first segment (12 steps)
    # does not count again, and the seed's relative `out` is recognised.
    expert_flops = 3 * STEPS["expert-code"] * TOKENS_PER_STEP * FLOPS_PER_TOKEN["dense"]
    finetune_flops = STEPS["btx"] * TOKENS_PER_STEP * FLOPS_PER_TOKEN["moe"]
    btx = _row(on_disk, "compute", "btx")
    assert btx["flops"] == expert_flops + finetune_flops
    assert btx["tokens"] == (3 * STEPS["expert-code"] + STEPS["btx"]) * TOKENS_PER_STEP
    assert btx["parallel_share"] == pytest.approx(expert_flops / (expert_flops + finetune_flops))
    assert btx["moe_share"] == pytest.approx(finetune_flops / (expert_flops + finetune_flops))
    # device-seconds = 2 x wall (2 ranks); wall = 0.25 s/step dense, 0.5 s/step MoE
    assert btx["device_hours"] == pytest.approx(2 * (3 * 20 * 0.25 + 20 * 0.5) / 3600)
    assert _row(on_disk, "compute", "seed")["flops"] == STEPS["seed"] * TOKENS_PER_STEP * FLOPS_PER_TOKEN["dense"]
    assert _row(on_disk, "compute", "upcycle-compute")["flops_vs_btx"] == pytest.approx(1.0)
    assert _row(on_disk, "compute", "dense")["flops_vs_btx"] == pytest.approx(78 * 8 / (60 * 12), rel=1e-9)
    assert [r["key"] for r in on_disk["tables"]["ledger"]["rows"]].count("experts/math") == 1
    # The data table: documents and tokens per domain and split, skipped records.
    data = {r["key"]: r["values"] for r in on_disk["tables"]["data"]["rows"]}
    assert [r["domain"] for r in on_disk["data"]] == DOMAINS
    assert data["math"]["train_documents"] == DATA_DOCS[1] and data["math"]["train_tokens"] == 1000 * DATA_DOCS[1]
    assert data["wiki"]["valid_documents"] == 3 and data["wiki"]["bad_records"] == 2
    assert on_disk["missing"] == []


def test_findings_are_computed_and_honest(run):
    report = build_report(run)
    f = {x["id"]: x for x in report["findings"]}
    # Experts: code and math beat the seed on their domain, wiki does not (6.1 vs 6.0 loss).
    assert f["expert_beats_seed:code"]["holds"] and f["expert_beats_seed:math"]["holds"]
    assert not f["expert_beats_seed:wiki"]["holds"]
    assert "does not beat" in f["expert_beats_seed:wiki"]["text"]
    # BTX against the best expert: on code 4.2 vs 4.0 loss -> exp(0.2) - 1 above.
    gap = f["btx_vs_best_expert:code"]
    assert not gap["holds"] and gap["values"]["expert"] == "code"
    assert gap["values"]["gap_pct"] == pytest.approx(100 * (math.exp(0.2) - 1))
    assert f"{100 * (math.exp(0.2) - 1):.1f} % above" in gap["text"]
    assert f["btx_vs_best_expert:wiki"]["holds"]  # 5.8 beats the best expert's 6.1 (the seed's expert)
    # Averages: BTX beats the seed and data-matched upcycling, not the dense baseline.
    assert f["btx_vs:seed:ppl"]["holds"] and f["btx_vs:upcycle-data:ppl"]["holds"]
    dense = f["btx_vs:dense:ppl"]
    assert not dense["holds"] and dense["text"].startswith("BTX does not beat Dense (compute-matched)")
    assert f["btx_vs:dense:tasks"]["holds"]  # (18+8+29)/3 > (14+6+29)/3
    assert "within two standard errors" in f["btx_vs:dense:tasks"]["text"]  # 40 documents: within noise
    # Compute matching: upcycling got BTX's FLOPs, the dense baseline only 78/90 of them.
    assert f["compute_matched:upcycle-compute"]["holds"]
    assert not f["compute_matched:dense"]["holds"]
    # Routing: mean over the 2 layers of each domain's share to its own expert vs uniform 1/4.
    own = {d: sum(ROUTING[d][l][i] for l in ROUTING[d]) / 2 for i, d in enumerate(DOMAINS)}
    for d in DOMAINS:
        assert f[f"routing_own_expert:{d}"]["values"]["share"] == pytest.approx(own[d])
        assert f[f"routing_own_expert:{d}"]["holds"] == (own[d] > 0.25)
    md = (run / "report" / "report.md").read_text()
    for x in report["findings"]:
        assert ("✓ " if x["holds"] else "✗ ") + x["text"] in md


def test_missing_inputs_still_give_a_report(run):
    (run / "eval" / "upcycle-data" / "results.json").unlink()
    shutil.rmtree(run / "eval" / "btm-top1")
    (run / "btx" / "finetuned" / "routing.json").unlink()
    (run / "config.yaml").unlink()
    # BTX evaluated before its finetune finished: the eval stage fell back to the mixed model.
    btx = json.loads((run / "eval" / "btx" / "results.json").read_text())
    btx["nemo_btx"]["checkpoints"] = [str(run / "btx" / "mixed")]
    (run / "eval" / "btx" / "results.json").write_text(json.dumps(btx))
    report = build_report(run)
    assert report["models"]["btx"]["label"] == "BTX (mixed, not finetuned)"
    missing = "\n".join(report["missing"])
    for what in ("eval/upcycle-data/results.json", "eval/btm-top1/results.json",
                 "btx/finetuned/routing.json", "seed/config.yaml instead"):
        assert what in missing
    assert report["config_source"] == "seed/config.yaml" and report["config"]["data"]["domains"]
    # Without eval, perplexity falls back to the training manifest's validation loss (marked †)...
    row = _row(report, "results", "upcycle-data")
    assert row["ppl:code"] == pytest.approx(math.exp(LOSS["upcycle-data"]["code"] + TRAIN_OFFSET))
    assert row["gsm8k"] is None
    # ...and a model with neither shows dashes; nothing is made up.
    assert all(v is None for v in _row(report, "results", "btm-top1").values())
    md = (run / "report" / "report.md").read_text()
    assert _table_line(md, "BTM top-1").count("| – ") == 6
    assert f"{math.exp(LOSS['upcycle-data']['code'] + TRAIN_OFFSET):.1f}†" in _table_line(
        md, "Sparse upcycling (data-matched)")
    assert "routing.png" not in report["figures"] and not (run / "report" / "routing.png").exists()
    assert any("btm-top1" in s or "BTM top-1" in s for s in report["not_assessed"])


def test_models_left_out_of_eval_models_are_not_missing(run):
    """A run that evaluates only some models (eval.models) reports the others as not
    evaluated by choice: no missing entry, their perplexity from training, dashes for tasks."""
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    config.setdefault("eval", {})["models"] = ["seed", "btx"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(run / "eval" / "dense")
    report = build_report(run)
    assert not any("eval/dense" in m for m in report["missing"]), report["missing"]
    assert _row(report, "results", "dense")["gsm8k"] is None
    (run / "eval" / "seed" / "results.json").unlink()  # asked for, absent: missing
    assert any("eval/seed/results.json" in m for m in build_report(run)["missing"])


def test_other_lm_eval_tasks_get_their_own_column(run):
    """Any lm-eval task named in eval.tasks (here hellaswag, and a task whose only metric is not
    an accuracy) is shown by its first accuracy-like metric, with its documents; a model that
    did not run it shows a dash."""
    for name, (acc, norm) in {"seed": (0.25, 0.30), "btx": (0.40, 0.45)}.items():
        path = run / "eval" / name / "results.json"
        res = json.loads(path.read_text())
        res["results"]["hellaswag"] = {"alias": "hellaswag", "acc,none": acc, "acc_norm,none": norm,
                                       "acc_stderr,none": 0.01}
        res["results"]["wikitext"] = {"alias": "wikitext", "word_perplexity,none": 30.0}
        res["n-samples"]["hellaswag"] = {"original": 10042, "effective": 40}
        res["nemo_btx"]["tasks"] += ["hellaswag", "wikitext"]
        path.write_text(json.dumps(res))
    report = build_report(run)
    keys = [t["key"] for t in report["tasks"]]
    assert keys == ["gsm8k", "humaneval", "mmlu", "hellaswag"]
    assert report["tasks"][-1]["metric"] == "acc,none"
    assert _row(report, "results", "seed")["hellaswag"] == 0.25
    assert _row(report, "results", "btx")["hellaswag"] == 0.40
    assert _row(report, "results", "dense")["hellaswag"] is None
    header = next(line for line in (run / "report" / "report.md").read_text().splitlines()
                  if line.startswith("| Model") and "GSM8K" in line)
    assert "hellaswag" in header and "wikitext" not in header


def test_nearly_empty_run_directory(tmp_path):
    """A run with nothing but the seed's manifest: still a report, everything else missing."""
    run = make_run(tmp_path / "full")
    bare = tmp_path / "bare"
    (bare / "seed").mkdir(parents=True)
    shutil.copy(run / "seed" / "manifest.json", bare / "seed" / "manifest.json")
    report = build_report(bare)
    assert (bare / "report" / "report.html").is_file()
    assert any("ledger.jsonl" in m for m in report["missing"])
    assert report["compute"]["btx"]["present"] is False


def test_a_failed_build_keeps_the_previous_report(run, monkeypatch):
    build_report(run)
    before = {p.name: p.read_bytes() for p in (run / "report").iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("plotting died")

    monkeypatch.setattr(plots, "routing_heatmap", boom)
    with pytest.raises(RuntimeError, match="plotting died"):
        build_report(run)
    assert {p.name: p.read_bytes() for p in (run / "report").iterdir()} == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".report")] == []

    # A successful rebuild replaces the report and leaves nothing behind.
    monkeypatch.undo()
    (run / "eval" / "dense" / "results.json").unlink()
    report = build_report(run)
    assert json.loads((run / "report" / "report.json").read_text())["missing"] == report["missing"] != []
    assert [p.name for p in run.iterdir() if p.name.startswith(".report")] == []


def test_leftovers_of_a_killed_build_are_removed(run):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = run / f".report.tmp-{socket.gethostname()}-{dead.pid}-abc123"
    (leftover / "half").mkdir(parents=True)
    live = run / f".report.tmp-{socket.gethostname()}-{os.getpid()}-def456"
    live.mkdir()
    build_report(run)
    assert not leftover.exists()
    assert live.exists()  # a build still running (here: this process) is left alone


def test_report_is_self_contained_and_imports_no_torch(run):
    """The report runs on a login node: no torch or megatron import, HTML without outside files."""
    code = ("import sys; from nemo_btx.stages.report import build_report; build_report(sys.argv[1]); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'lm_eval')); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code, str(run)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (run / "report" / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]*)"', html)
    assert len(srcs) == len(FIGURES) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"<link|<script|src=\"http|url\(", html)
    assert "<details><summary>Resolved config (config.yaml)</summary>" in html


def test_stage_entry_point_writes_into_the_run_directory(run):
    from nemo_btx.config.schema import ExperimentConfig, RunConfig
    from nemo_btx.stages import report as stage

    stage.run(ExperimentConfig(run=RunConfig(dir=str(run))))
    assert (run / "report" / "report.json").is_file()


# --------------------------------------------------------------------------- a real browser


def _chromium():
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


#: Appended to a copy of the page: after load, record how many images decoded and tables exist.
PROBE = ("<script>window.addEventListener('load', () => { const im = [...document.images]; "
         "document.body.setAttribute('data-images', im.length); "
         "document.body.setAttribute('data-decoded', im.filter(i => i.complete && i.naturalWidth > 0).length); "
         "document.body.setAttribute('data-tables', document.querySelectorAll('table tbody tr').length); "
         "});</script>")


def render_in_chromium(html_path: Path, tmp: Path) -> dict:
    """Load the page in headless chromium; return what the probe saw and a screenshot path."""
    page = tmp / "probe.html"
    page.write_text(Path(html_path).read_text().replace("</body>", PROBE + "</body>"))
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}",
            "--virtual-time-budget=10000"]
    dom = subprocess.run(base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(1)))
    shot = tmp / "shot.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1280,2400", Path(html_path).as_uri()],
                   capture_output=True, text=True, timeout=120)
    return {"images": int(attrs.get("images", -1)), "decoded": int(attrs.get("decoded", -1)),
            "rows": int(attrs.get("tables", -1)), "dom": dom.stdout, "shot": shot}


def test_html_renders_in_headless_chromium(run, tmp_path):
    if _chromium() is None:
        missing_system_package("chromium is not installed")
    report = build_report(run)
    seen = render_in_chromium(run / "report" / "report.html", tmp_path)
    assert seen["images"] == len(report["figures"]) == len(FIGURES)
    assert seen["decoded"] == seen["images"]
    rows = sum(len(t["rows"]) for t in report["tables"].values())
    assert seen["rows"] == rows
    assert 'id="table-results"' in seen["dom"] and ">BTX</td>" in seen["dom"]
    from PIL import Image

    with Image.open(seen["shot"]) as im:
        assert im.size == (1280, 2400)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50  # not a blank page


# --------------------------------------------------------------------------- a real run


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1500)
def test_report_of_a_real_run(tmp_path, request):
    """On a run made by `nemo-btx run`: $NEMO_BTX_REAL_RUN, else the session's small experiment."""
    run = Path(os.environ.get("NEMO_BTX_REAL_RUN") or request.getfixturevalue("small_experiment")[0])
    report = build_report(run, tmp_path / "report")
    # Every evaluated model's numbers are its results.json's.
    for name, m in report["models"].items():
        path = run / "eval" / name / "results.json"
        if not path.is_file():  # listed as missing, unless the run chose not to evaluate it
            chosen = (report["config"].get("eval") or {}).get("models")
            assert (chosen is not None and name not in chosen) or \
                any(f"eval/{name}/results.json" in x for x in report["missing"]), name
            continue
        res = json.loads(path.read_text())
        for d, p in (res["nemo_btx"].get("perplexity") or {}).items():
            assert _row(report, "results", name)[f"ppl:{d}"] == p["perplexity"]
    # BTX's FLOPs are the experts' and the finetune's last ledger lines.
    last = {}
    for line in (run / "ledger.jsonl").read_text().splitlines():
        e = json.loads(line)
        last[str((run / e["out"]).resolve())] = e  # relative outs are under the run dir
    experts, finetuned = (run / "experts").resolve(), (run / "btx" / "finetuned").resolve()
    parts = [e["flops"] for out, e in last.items() if Path(out).parent == experts or Path(out) == finetuned]
    if report["compute"]["btx"]["present"]:
        assert report["compute"]["btx"]["flops"] == pytest.approx(sum(parts))
    if _chromium():
        seen = render_in_chromium(tmp_path / "report" / "report.html", tmp_path)
        assert seen["decoded"] == seen["images"] == len(report["figures"])
