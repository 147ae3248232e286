"""Stage `report`: the comparison report that ends the experiment.

Reads only files of the run directory (manifests, metrics, ledger, routing, eval results) and
writes `<run.dir>/report/`: report.md, report.html (self-contained), report.json (every number
of the tables) and the PNG figures. It runs without torch in seconds, so it can be rerun at any
time, also while stages are still running: what is not there yet is listed as missing.

The report is built in a hidden sibling directory and renamed into place, so a killed build
never leaves a half report that looks complete, and the previous report survives a failure.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import BtxError
from nemo_btx.run_dir import REPORT_JSON, RunDir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: Leftovers of a build killed on another host are removed once they are this old.
STALE_AFTER_S = 24 * 3600


def run(cfg: ExperimentConfig) -> None:
    build_report(Path(cfg.run.dir))


def build_report(run_dir: Path, out_dir: Optional[Path] = None) -> dict:
    """Write the report of `run_dir` into `out_dir` (default `<run_dir>/report`); return the
    content of report.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BtxError(f"{run_dir}: no such run directory")
    out_dir = Path(out_dir) if out_dir is not None else RunDir(run_dir).report
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    _remove_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out_dir)}{socket.gethostname()}-{os.getpid()}-",
                                dir=out_dir.parent))
    try:
        # mkdtemp makes 0700; give the report the mode a plain mkdir would (shared clusters).
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        report = _write(run_dir, tmp)
        from nemo_btx.artifacts import replace_dir

        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    held = sum(f["holds"] for f in report["findings"])
    log.info("report: %s (%d of %d findings hold, %d inputs missing, %.1f s)", out_dir / "report.html",
             held, len(report["findings"]), len(report["missing"]), time.monotonic() - start)
    return report


def _write(run_dir: Path, out: Path) -> dict:
    from nemo_btx.artifacts import write_json_atomic, write_text_atomic
    from nemo_btx.reporting import compute, document, findings, html, markdown, plots, tables
    from nemo_btx.reporting.collect import collect

    data = collect(run_dir)
    data["reporter"] = _reporter_versions()
    comp = compute.compute_table(data["ledger"], data["domains"])
    results = tables.results_table(data)
    built = {"results": results, "aggregate": tables.aggregate_table(data, results),
             "compute": tables.compute_table(comp),
             "ledger": tables.ledger_table(compute.stage_rows(data["ledger"])),
             "data": tables.data_table(data["data"])}
    by_domain = tables.domain_table(data)
    if by_domain is not None:
        built["domains"] = by_domain
    found, skipped = findings.findings(data, results, built["aggregate"], comp)
    figures = plots.draw_all(data, out)
    blocks = document.build(data, built, found, skipped, figures)

    report = {
        "format_version": FORMAT_VERSION, "run_dir": data["run_dir"], "generated": data["generated"],
        "domains": data["domains"], "tasks": data["tasks"],
        "models": {name: {"label": m["label"], "train_dir": m["train_dir"],
                          "eval": m["eval"]["path"] if m["eval"] else None,
                          "eval_limit": m["eval"]["limit"] if m["eval"] else None,
                          "tasks": m["tasks"],
                          "documents": m["eval"]["documents"] if m["eval"] else None,
                          "perplexity": m["perplexity"]} for name, m in data["models"].items()},
        "tables": {key: t.to_json() for key, t in built.items()},
        "compute": comp, "ledger": data["ledger"],
        "findings": found, "not_assessed": skipped,
        "routing": data["routing"], "mix": data["mix"], "data": data["data"],
        "figures": figures, "missing": data["missing"],
        "versions": data["versions"], "reporter": data["reporter"],
        "config": data["config"]["data"], "config_source": data["config"]["source"],
    }
    write_text_atomic(out / "report.md", markdown.render(blocks))
    write_text_atomic(out / "report.html", html.render(blocks, out))
    write_json_atomic(out / REPORT_JSON, json.loads(json.dumps(report, default=str)))
    return report


def _reporter_versions() -> dict:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("nemo-btx", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _tmp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-"


def _remove_leftovers(out_dir: Path) -> None:
    """Temporary directories of builds that were killed: on this host when their process is
    gone, anywhere once they are a day old (a live build on another node is never that slow)."""
    host = socket.gethostname()
    for pattern in (f"{_tmp_prefix(out_dir)}*", f".{out_dir.name}.old-*"):
        for path in out_dir.parent.glob(pattern):
            try:
                age = time.time() - path.stat().st_mtime
            except OSError:
                continue
            stale = age > STALE_AFTER_S
            if not stale and path.name.startswith(_tmp_prefix(out_dir)):
                rest = path.name[len(_tmp_prefix(out_dir)):]
                name, _, pid = rest.rpartition("-")[0].rpartition("-")
                stale = name == host and pid.isdigit() and not _alive(int(pid))
            if stale:
                log.info("report: removing %s (left by a killed build)", path)
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
