"""The code's shape: no import cycles, the run directory's layout in one module, orchestration
without torch (it runs on login nodes)."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO, clean_env

PACKAGE = REPO / "nemo_btx"


def _modules() -> dict:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(name: str, path: Path, known: set) -> set:
    """Every nemo_btx module `name` imports, at the top or inside a function."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
            mod = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name}


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def _graph():
    mods = _modules()
    return {n: _imports(n, f, set(mods)) for n, f in mods.items()}


def _top(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_no_import_cycles_between_modules_or_packages():
    graph = _graph()
    assert _cycles(graph) == []
    packages = {}
    for mod, deps in graph.items():
        for d in deps:
            if _top(d) != _top(mod):
                packages.setdefault(_top(mod), set()).add(_top(d))
    cycles = _cycles(packages)
    inside = {p for c in cycles for p in c}
    assert cycles == [], "package cycle; its edges: " + "; ".join(
        f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
        if _top(m) != _top(d) and _top(m) in inside and _top(d) in inside)


def test_stages_never_import_orchestration():
    """Orchestration starts stages as processes; stages must not depend on it back."""
    graph = _graph()
    offenders = [(m, d) for m, deps in graph.items() for d in deps
                 if not m.startswith("nemo_btx.orchestration") and d.startswith("nemo_btx.orchestration")
                 and m != "nemo_btx.cli"]
    assert offenders == []


#: Names of run-directory entries: only nemo_btx/run_dir.py may join them onto a path.
RUN_DIR_NAMES = {"seed", "experts", "btx", "mixed", "finetuned", "baselines", "upcycled", "upcycle",
                 "eval", "report", "tokenizer", "data", "imported", "hf", "logs", "replaced", "slurm",
                 "init", "weights", "ledger.jsonl", "config.yaml", "manifest.json", "results.json",
                 "report.json", "routing.json", "metrics.jsonl", "jobs.json", "events.jsonl",
                 "btx_checkpoint.json", "data_matched", "compute_matched", "dense"}


#: Joins of those names that are not the run directory: package data and the repository's own
#: folders (`conf/config.yaml`, `slurm/<example>`, a pip package's `data/`).
NOT_THE_RUN_DIR = {("nemo_btx.evaluation.benchmarks", "data"), ("nemo_btx.config.load", "config.yaml"),
                   ("nemo_btx.orchestration.slurm", "slurm")}


def test_run_directory_layout_is_written_once():
    """No `something / "seed"` or "btx/finetuned" outside nemo_btx/run_dir.py."""
    found = []
    for name, path in _modules().items():
        if name == "nemo_btx.run_dir":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                    and isinstance(node.right, ast.Constant) and node.right.value in RUN_DIR_NAMES
                    and (name, node.right.value) not in NOT_THE_RUN_DIR):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} / {node.right.value!r}")
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and any(f"{a}/{b}" in node.value for a, b in (("btx", "finetuned"), ("btx", "mixed"),
                                                                ("baselines", "upcycle")))
                  and not _in_docstring(node, path)):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value[:40]!r}")
    assert found == [], "run-directory paths built outside run_dir.py:\n" + "\n".join(found)


def _in_docstring(node, path) -> bool:
    """Constants that are docstrings or log/error text mentioning a path are fine; code that
    builds a path is not. Approximated: a string with spaces is prose."""
    return " " in node.value


def test_orchestration_imports_no_torch():
    """`launch` renders a 7B chain on a login node: planning and rendering import no torch."""
    code = ("import sys\n"
            "from nemo_btx.config import load_config\n"
            "from nemo_btx.orchestration.units import pending, plan\n"
            "from nemo_btx.orchestration.slurm import Target, build_jobs, render_files\n"
            "o = ['experiment=llama2_7b_h100', 'run.dir=' + sys.argv[1]]\n"
            "cfg = load_config(o)\n"
            "pending(plan(cfg))\n"
            "render_files(cfg, Target(None, 'python'), build_jobs(cfg, o))\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'lm_eval'))\n"
            "print(heavy[:3])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "runs" / "no-such-run")], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
