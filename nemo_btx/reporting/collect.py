"""Every number the report shows, gathered from the run directory into one plain dict.

Reading is kept apart from presenting so that report.json, the tables, the plots and the
findings all come from the same values, and a test can check them against the source files.
Nothing here fails on a missing or half-written input: an experiment is often reported while
some stages are still running, so what is absent is listed under `missing` instead.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from nemo_btx.evaluation.suite import domain_of
from nemo_btx.run_dir import BASELINE_NAMES, MANIFEST, METRICS, RESULTS, ROUTING, RunDir


@dataclass(frozen=True)
class TaskSpec:
    key: str
    title: str
    task: str
    """lm-eval task or group name (eval/*.yaml)."""
    metric: str
    filter: str
    """Preferred filter of the metric; another filter of the same metric is the fallback."""


#: The headline metric of each benchmark, as lm-eval reports it ("metric,filter"); every one is
#: a mean of 0/1 outcomes per document, so its standard error is binomial.
TASKS = [
    TaskSpec("gsm8k", "GSM8K", "btx_gsm8k", "exact_match", "strict-match"),
    TaskSpec("humaneval", "HumanEval", "btx_humaneval", "pass@1", "sandbox"),
    TaskSpec("mmlu", "MMLU", "btx_mmlu", "acc", "none"),
    TaskSpec("math", "MATH", "btx_math", "exact_match", "none"),
    TaskSpec("mbpp", "MBPP", "btx_mbpp", "pass@1", "sandbox"),
    TaskSpec("nq_open", "NQ", "btx_nq_open", "exact_match", "remove_whitespace"),
    TaskSpec("triviaqa", "TriviaQA", "btx_triviaqa", "exact_match", "remove_whitespace"),
    TaskSpec("arc_easy", "ARC-e", "btx_arc_easy", "acc", "none"),
    TaskSpec("arc_challenge", "ARC-c", "btx_arc_challenge", "acc", "none"),
    TaskSpec("siqa", "SIQA", "btx_siqa", "acc", "none"),
    TaskSpec("piqa", "PIQA", "btx_piqa", "acc", "none"),
    TaskSpec("winogrande", "WinoGrande", "btx_winogrande", "acc", "none"),
]
#: What a report shows before any model asked for more (the default eval.tasks).
DEFAULT_TASKS = ("gsm8k", "humaneval", "mmlu")


#: The metric a task outside TASKS (any lm-eval task named in eval.tasks) is shown by: the first
#: of these it reports, each a mean of 0/1 outcomes per document like TASKS' metrics.
ACCURACY_METRICS = ("acc", "exact_match", "pass@1", "acc_norm", "em")


def other_tasks(results: dict) -> List[TaskSpec]:
    """Specs of the tasks an evaluation ran besides TASKS (lm-eval's own, by name), by the first
    accuracy-like metric each reports; a task with none is left out."""
    known = {t.task for t in TASKS}
    out = []
    for name in (results.get("nemo_btx") or {}).get("tasks") or []:
        metrics = (results.get("groups") or {}).get(name) or (results.get("results") or {}).get(name)
        if name in known or not isinstance(metrics, dict):
            continue
        keys = sorted(k for k in metrics if "," in k and "_stderr" not in k and _number(metrics[k]) is not None)
        for metric in ACCURACY_METRICS:
            hits = [k for k in keys if k.split(",")[0] == metric]
            if hits:
                out.append(TaskSpec(name, name, name, metric, hits[0].split(",", 1)[1]))
                break
    return out


def asked_tasks(evals: List[dict]) -> List[TaskSpec]:
    """The benchmarks the run's evaluations ran or skipped (the defaults before any did): ours
    in TASKS' order, then any other lm-eval task in the order first met."""
    asked = {t for ev in evals for t in [*ev["asked"], *ev["skipped"]]}
    chosen = [t for t in TASKS if t.task in asked]
    for ev in evals:
        for spec in ev.get("other_tasks", []):
            if spec["key"] not in {t.key for t in chosen}:
                chosen.append(TaskSpec(**spec))
    return chosen or [t for t in TASKS if t.key in DEFAULT_TASKS]


def model_catalog(run_dir: Path, domains: List[str], baselines: Optional[List[str]] = None) -> List[dict]:
    """[{name, label, train_dir}] for every model the report compares (nemo_btx/run_dir.py)."""
    rd = RunDir(run_dir)
    known = [b for b in (baselines if baselines is not None else BASELINE_NAMES) if b in BASELINE_NAMES]
    return [{"name": m.name, "label": m.label, "train_dir": m.train_dir} for m in rd.models(domains, known)]


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> List[dict]:
    """Records of a .jsonl file; a line cut short by a kill is skipped, not fatal."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _number(value) -> Optional[float]:
    """A finite float, or None (lm-eval writes "N/A" for stderrs it did not compute)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------- config, versions


def read_config(run_dir: Path, missing: List[str]) -> dict:
    """The resolved experiment config: `<run.dir>/config.yaml`, else the seed stage's copy."""
    import yaml

    for rel in ("config.yaml", "seed/config.yaml"):
        path = run_dir / rel
        if path.is_file():
            text = path.read_text()
            if rel != "config.yaml":
                missing.append(f"config.yaml (the experiment config; showing {rel} instead)")
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError:
                data = None
            return {"source": rel, "text": text, "data": data if isinstance(data, dict) else {}}
    missing.append("config.yaml (no resolved config in the run directory)")
    return {"source": None, "text": "", "data": {}}


def domain_list(config: dict, manifests: Dict[str, dict]) -> List[str]:
    """Domains in data order (the order experts are mixed in), from the config if it has them."""
    doms = ((config.get("data") or {}).get("domains")) or []
    names = [d.get("name") for d in doms if isinstance(d, dict) and d.get("name")]
    if names:
        return names
    seen: List[str] = []
    for m in manifests.values():
        for d in (m.get("valid_loss") or {}):
            if d not in seen:
                seen.append(d)
    return seen


def expert_list(config: dict, domains: List[str]) -> List[str]:
    """The domains with an expert (`expert: false` marks general text without one)."""
    doms = ((config.get("data") or {}).get("domains")) or []
    general = {d.get("name") for d in doms if isinstance(d, dict) and d.get("expert") is False}
    return [d for d in domains if d not in general]


def versions(sources: Dict[str, dict]) -> dict:
    """The software versions of the run; `differ` lists packages whose versions vary by stage."""
    by_source = {k: v for k, v in sources.items() if isinstance(v, dict) and v}
    merged: Dict[str, str] = {}
    differ: Dict[str, Dict[str, str]] = {}
    for src, vers in by_source.items():
        for pkg, ver in vers.items():
            merged.setdefault(pkg, ver)
            if merged[pkg] != ver:
                differ.setdefault(pkg, {})
    for pkg in differ:
        differ[pkg] = {src: v[pkg] for src, v in by_source.items() if pkg in v}
    return {"packages": merged, "differ": differ, "sources": sorted(by_source)}


# --------------------------------------------------------------------------- training stages


def training_stage(run_dir: Path, rel: str) -> Optional[dict]:
    """A training stage's manifest summary and its loss curves; None if it never started."""
    out = run_dir / rel
    manifest = _read_json(out / MANIFEST)
    records = _read_jsonl(out / METRICS)
    if manifest is None and not records:
        return None
    curve: Dict[str, list] = {"step": [], "tokens": [], "loss": []}
    valid: Dict[str, Dict[str, list]] = {}
    for rec in records:
        loss = _number(rec.get("loss"))
        if loss is not None and _number(rec.get("tokens")) is not None:
            curve["step"].append(rec.get("step"))
            curve["tokens"].append(rec["tokens"])
            curve["loss"].append(loss)
        for dom, value in (rec.get("valid") or {}).items():
            v = valid.setdefault(dom, {"tokens": [], "loss": []})
            if _number(value) is not None:
                v["tokens"].append(rec.get("tokens"))
                v["loss"].append(float(value))
    m = manifest or {}
    return {
        "dir": rel, "complete": bool(m.get("complete")), "stage": m.get("stage"),
        "steps": m.get("steps"), "tokens_seen": m.get("tokens_seen"),
        "valid_loss": {d: float(v) for d, v in (m.get("valid_loss") or {}).items() if _number(v) is not None},
        "parent": m.get("parent"), "train_flops_per_token": m.get("train_flops_per_token"),
        "versions": m.get("versions") or {}, "curve": curve, "valid": valid,
    }


# --------------------------------------------------------------------------- evaluation results


def task_score(results: dict, spec: TaskSpec) -> Optional[float]:
    """The headline metric of one task or group from lm-eval's results dict."""
    for section in ("groups", "results"):
        metrics = (results.get(section) or {}).get(spec.task)
        if not isinstance(metrics, dict):
            continue
        value = _number(metrics.get(f"{spec.metric},{spec.filter}"))
        if value is not None:
            return value
        for key in sorted(metrics):
            if key.split(",")[0] == spec.metric and _number(metrics[key]) is not None:
                return float(metrics[key])
    return None


def task_documents(results: dict, task: str) -> Optional[int]:
    """Documents behind a score (a group: the sum over its subtasks), so the report can say how
    noisy a number is."""
    n_samples = results.get("n-samples") or {}
    if task in n_samples:
        entry = n_samples[task]
        return int(entry.get("effective", entry.get("original", 0))) if isinstance(entry, dict) else None
    subtasks = (results.get("group_subtasks") or {}).get(task)
    if not subtasks:
        return None
    counts = [task_documents(results, t) for t in subtasks]
    return sum(counts) if counts and all(c is not None for c in counts) else None


def _inside(path: str, folder: Path) -> bool:
    """Whether a checkpoint path recorded by the eval stage lies in `folder` (by name, so a run
    directory that was moved afterwards still matches)."""
    return Path(folder).name in Path(path).parts and Path(folder).parent.name in Path(path).parts


def eval_result(run_dir: Path, name: str) -> Optional[dict]:
    path = RunDir(run_dir).eval_dir(name) / RESULTS
    results = _read_json(path)
    if not isinstance(results, dict):
        return None
    ours = results.get("nemo_btx") or {}
    perplexity = {}
    for dom, entry in (ours.get("perplexity") or {}).items():
        value = _number(entry.get("perplexity")) if isinstance(entry, dict) else _number(entry)
        if value is not None:
            perplexity[dom] = value
    others = other_tasks(results)
    specs = [*TASKS, *others]
    return {
        "path": str(path.relative_to(run_dir)),
        "tasks": {t.key: task_score(results, t) for t in specs},
        "documents": {t.key: n for t in specs if (n := task_documents(results, t.task)) is not None},
        "other_tasks": [asdict(t) for t in others],
        "perplexity": perplexity, "limit": ours.get("limit"), "checkpoints": ours.get("checkpoints") or [],
        "versions": ours.get("versions") or {},
        "skipped": ours.get("skipped_tasks") or {},
        "asked": ours.get("tasks") or [],
    }


# --------------------------------------------------------------------------- ledger, routing


def _ledger_place(out: str, run_dir: Path, domains: List[str]) -> Optional[str]:
    """`out` relative to the run directory; a run directory that was moved after training still
    matches by its known sub-paths."""
    p = Path(out)
    try:
        return str((p if p.is_absolute() else run_dir / p).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        pass
    known = list(RunDir(run_dir).training_dirs(domains).values())
    for rel in sorted(known, key=len, reverse=True):
        if p.as_posix().endswith("/" + rel):
            return rel
    return None


def ledger(run_dir: Path, domains: List[str]) -> List[dict]:
    """One entry per trained output directory: its LAST ledger line, which holds the stage's
    cumulative totals (a resumed stage appends a new line with its whole totals)."""
    last: Dict[str, dict] = {}
    for entry in _read_jsonl(RunDir(run_dir).ledger):
        if "out" not in entry:
            continue
        rel = _ledger_place(str(entry["out"]), run_dir, domains)
        key = rel if rel is not None else str(Path(entry["out"]))
        last.pop(key, None)  # keep the order of the last lines
        last[key] = {**entry, "rel": rel, "category": RunDir(run_dir).category_of(rel, domains)}
    return list(last.values())


def expert_names(run_dir: Path, finetuned: Optional[dict]) -> Optional[List[str]]:
    """Names of the MoE's experts in order, from the mix manifest of the finetune's input
    (segments of a split expert get a #chunk suffix)."""
    candidates = []
    parent = (finetuned or {}).get("parent")
    if parent:
        p = Path(parent)
        candidates.append(p if p.is_absolute() else run_dir / p)
    candidates.append(RunDir(run_dir).mixed)
    for path in candidates:
        manifest = _read_json(path / MANIFEST)
        experts = ((manifest or {}).get("moe") or {}).get("experts")
        if not experts:
            continue
        labels = ["+".join(str(seg.get("source")) for seg in expert) for expert in experts]
        out, counts = [], {lab: labels.count(lab) for lab in labels}
        seen: Dict[str, int] = {}
        for lab in labels:
            seen[lab] = seen.get(lab, 0) + 1
            out.append(lab if counts[lab] == 1 else f"{lab}#{seen[lab]}")
        return out
    return None


def routing(run_dir: Path, finetuned: Optional[dict], missing: List[str]) -> Optional[dict]:
    rd = RunDir(run_dir)
    rel = rd.rel(rd.finetuned / ROUTING)
    data = _read_json(rd.finetuned / ROUTING)
    if not isinstance(data, dict) or not data.get("fractions"):
        missing.append(f"{rel} (BTX routing analysis)")
        return None
    fractions = {dom: {str(layer): [float(x) for x in shares] for layer, shares in by_layer.items()}
                 for dom, by_layer in data["fractions"].items()}
    num = data.get("num_experts") or max(len(s) for by in fractions.values() for s in by.values())
    names = expert_names(run_dir, finetuned)
    if names is None or len(names) != num:
        if names is not None:
            missing.append(f"expert names (the mix manifest lists {len(names)} experts, routing.json {num})")
        names = [f"E{i}" for i in range(num)]
    return {"source": rel, "domains": data.get("domains") or sorted(fractions), "experts": names,
            "num_experts": num, "router_topk": data.get("router_topk"), "fractions": fractions}


# --------------------------------------------------------------------------- datasets


def datasets(run_dir: Path, domains: List[str], missing: List[str]) -> List[dict]:
    """Per domain: documents and tokens of each split, from its data manifest."""
    rd = RunDir(run_dir)
    out = []
    for d in domains:
        m = _read_json(rd.data_manifest(d))
        if not isinstance(m, dict) or "splits" not in m:
            missing.append(f"{rd.rel(rd.data_manifest(d))} (data of {d})")
            continue
        s = m["splits"]
        out.append({"domain": d, "train_documents": s["train"].get("documents"),
                    "train_tokens": s["train"].get("tokens"), "valid_documents": s["valid"].get("documents"),
                    "valid_tokens": s["valid"].get("tokens"),
                    "external": (m.get("external") or {}).get("prefix"),
                    "bad_records": sum(((m.get("bad_records") or {}).get("counts") or {}).values())})
    return out


# --------------------------------------------------------------------------- everything


def collect(run_dir: Path) -> dict:
    """All inputs of the report, as plain JSON-ready data."""
    run_dir = Path(run_dir)
    missing: List[str] = []
    config = read_config(run_dir, missing)

    rd = RunDir(run_dir)
    manifests = {}
    probe = list(rd.training_dirs([]).values())
    for rel in probe + [rd.rel(p) for p in sorted(rd.experts.glob("*"))]:
        m = _read_json(run_dir / rel / MANIFEST)
        if isinstance(m, dict):
            manifests[rel] = m
    domains = domain_list(config["data"], manifests)
    which = ((config["data"].get("baselines") or {}).get("which")) if isinstance(config["data"], dict) else None
    chosen = ((config["data"].get("eval") or {}).get("models")) if isinstance(config["data"], dict) else None

    models: Dict[str, dict] = {}
    stages: Dict[str, dict] = {}
    version_sources: Dict[str, dict] = {}
    experts = expert_list(config["data"], domains)
    catalog = model_catalog(run_dir, experts, which)
    evals = {s["name"]: eval_result(run_dir, s["name"]) for s in catalog}
    tasks = asked_tasks([ev for ev in evals.values() if ev])
    for spec in catalog:
        name, rel = spec["name"], spec["train_dir"]
        stage = training_stage(run_dir, rel) if rel else None
        if rel and (stage is None or not stage["complete"]):
            missing.append(f"{rel}/{MANIFEST} ({spec['label']}: training "
                           f"{'not run' if stage is None else 'incomplete'})")
        if stage is not None:
            stages[name] = {"label": spec["label"], **stage}
            version_sources[rel] = stage["versions"]
        ev = evals[name]
        if ev is None:
            if chosen is None or name in chosen:  # else not evaluated by choice (eval.models)
                missing.append(f"eval/{name}/results.json ({spec['label']}: not evaluated)")
        else:
            version_sources[ev["path"]] = ev["versions"]
            gone = [t.title for t in tasks if ev["tasks"].get(t.key) is None]
            if gone:
                why = "; ".join(sorted(set(ev["skipped"].values())))
                missing.append(f"{ev['path']}: no {', '.join(gone)} score" + (f" (skipped: {why})" if why else ""))
        if name == "btx" and ev and ev["checkpoints"] and not _inside(ev["checkpoints"][0], rd.finetuned):
            spec["label"] = "BTX (mixed, not finetuned)"  # what the eval stage falls back to
        perplexity = {}
        for dom in domains:
            if ev is not None and dom in ev["perplexity"]:
                perplexity[dom] = {"value": ev["perplexity"][dom], "source": "eval"}
            elif stage is not None and dom in stage["valid_loss"]:
                # Same held-out windows as the eval stage, scored during training.
                perplexity[dom] = {"value": math.exp(stage["valid_loss"][dom]), "source": "train"}
        models[name] = {**spec, "eval": ev, "perplexity": perplexity,
                        "tasks": {t.key: (ev["tasks"].get(t.key) if ev else None) for t in tasks}}

    data_rows = datasets(run_dir, domains, missing)
    entries = ledger(run_dir, experts)
    if not entries:
        missing.append("ledger.jsonl (no compute ledger: the compute table is empty)")
    mixed = _read_json(rd.mixed / MANIFEST)
    if mixed is None:
        missing.append(f"{rd.rel(rd.mixed)}/{MANIFEST} (the BTX mix)")
    return {
        "run_dir": str(run_dir.resolve()),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "domains": domains,
        "experts": experts,
        "tasks": [{"key": t.key, "title": t.title, "task": t.task, "metric": f"{t.metric},{t.filter}",
                   "domain": domain_of(t.task)} for t in tasks],
        "config": config,
        "versions": versions(version_sources),
        "models": models,
        "stages": stages,
        "ledger": entries,
        "mix": {"include_seed": any(s.get("role") == "seed" for s in (mixed or {}).get("sources", [])),
                "num_experts": ((mixed or {}).get("moe") or {}).get("num_experts"),
                "router_init": (mixed or {}).get("router_init")} if mixed else None,
        "routing": routing(run_dir, manifests.get(rd.rel(rd.finetuned)), missing),
        "data": data_rows,
        "missing": missing,
    }
