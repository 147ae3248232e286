"""A non-editable install (`pip install .`, a wheel on a cluster) finds conf/ and eval/.

The project's wheel is built offline with the venv's own setuptools (nothing downloaded, nothing
installed into the venv), installed with --target into a temporary directory, and the command
line is run from another directory with that copy first on the path: `config`, `validate`, and
`run --only data` on a tiny budget read the packaged conf/, and lm-eval's TaskManager built by
nemo_btx.evaluation.runner indexes the packaged eval/ and loads the tasks' `!function`s from the
installed copy. An editable wheel built from the same tree resolves both names to the source
tree's directories instead, and a checkout reads the repository's.

The build runs in a copy of the repository: an in-tree build writes build/ and *.egg-info, which
concurrent runs in the checkout would share.
"""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, clean_env

PY = sys.executable
#: Top-level entries of the checkout a build never needs (.gitignore's and the VCS).
SKIP_TOP = {".git", ".venv", "runs", "build", "dist", ".pytest_cache"}


def _ignore(root: str, names):
    top = Path(root) == REPO
    return {n for n in names if (top and n in SKIP_TOP) or n == "__pycache__" or n.endswith(".egg-info")}


def _run(cmd, *, cwd, env, timeout=180):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc.stdout


def _data_files(name: str):
    return sorted(p.relative_to(REPO / name).as_posix() for p in (REPO / name).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def test_checkout_reads_the_repository_dirs(tmp_path, monkeypatch):
    from nemo_btx.config.load import conf_dir, load_config
    from nemo_btx.resources import data_dir

    assert conf_dir() == REPO / "conf" and data_dir("eval") == REPO / "eval"
    # NEMO_BTX_CONF_DIR still wins over both locations.
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    (tmp_path / "conf" / "model" / "mine.yaml").write_text(
        (REPO / "conf" / "model" / "tiny.yaml").read_text().replace("num_layers:", "num_layers: 3 #"))
    monkeypatch.setenv("NEMO_BTX_CONF_DIR", str(tmp_path / "conf"))
    assert conf_dir() == tmp_path / "conf"
    assert load_config(["model=mine"]).model.num_layers == 3


@pytest.mark.slow
def test_wheel_install_finds_conf_and_eval(tmp_path):
    src, wheels, target, work = (tmp_path / n for n in ("src", "wheels", "target", "work"))
    shutil.copytree(REPO, src, ignore=_ignore)
    work.mkdir()
    build_env = clean_env(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    build_env.pop("PYTHONPATH")
    _run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", wheels, src],
         cwd=work, env=build_env)
    (wheel,) = wheels.glob("nemo_btx-*.whl")
    _run([PY, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "-q", "--target", target, wheel],
         cwd=work, env=build_env)
    for name, pkg in (("conf", "_conf"), ("eval", "_eval")):
        shipped = sorted(p.relative_to(target / "nemo_btx" / pkg).as_posix()
                         for p in (target / "nemo_btx" / pkg).rglob("*") if p.is_file())
        assert shipped == _data_files(name), name

    env = clean_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = str(target)
    env.pop("NEMO_BTX_CONF_DIR", None)
    # Which nemo_btx is imported, where its conf/ and eval/ are, and what lm-eval finds there.
    probe = (
        "import json, nemo_btx, warnings\n"
        "from nemo_btx.config.load import conf_dir\n"
        "from nemo_btx.evaluation.runner import EVAL_DIR, datasets_sandbox, task_manager\n"
        "with datasets_sandbox():\n"
        "    tm = task_manager()\n"
        "    loaded = tm.load(['btx_humaneval'])\n"
        "task = loaded['tasks']['btx_humaneval']\n"
        "print(json.dumps({'file': nemo_btx.__file__, 'conf': str(conf_dir()), 'eval': str(EVAL_DIR),\n"
        "                  'tasks': sorted(tm.all_tasks), 'docs': len(task.test_docs()),\n"
        "                  'process_results': task.config.process_results.__code__.co_filename}))\n")
    got = json.loads(_run([PY, "-c", probe], cwd=work, env=env).strip().splitlines()[-1])
    assert Path(got["file"]) == target / "nemo_btx" / "__init__.py"
    assert Path(got["conf"]) == target / "nemo_btx" / "_conf"
    assert Path(got["eval"]) == target / "nemo_btx" / "_eval"
    assert {"btx_gsm8k", "btx_humaneval", "btx_mmlu", "btx_mmlu_anatomy"} <= set(got["tasks"])
    assert got["docs"] == 164
    assert got["process_results"] == str(target / "nemo_btx" / "evaluation" / "humaneval.py")

    cli = target / "bin" / "nemo-btx"
    out = _run([cli, "config", "model.num_layers=3"], cwd=work, env=env)
    assert "num_layers: 3" in out
    from conftest import paper_inputs

    out = _run([cli, "validate", "experiment=llama2_7b_h100", *paper_inputs(tmp_path / "paper")], cwd=work, env=env)
    assert "config OK: model llama2_7b" in out
    run = work / "run"
    _run([cli, "run", "--only", "data", f"run.dir={run}", "data.max_chars_per_domain=20000"],
         cwd=work, env=env, timeout=300)
    # `--only data` on a fresh run directory trained the tokenizer first (a missing need), then
    # each domain's data unit completed in its own process with the same PYTHONPATH.
    for domain in ("code", "math", "wiki"):
        manifest = json.loads((run / "data" / domain / "manifest.json").read_text())
        assert manifest["splits"]["train"]["tokens"] > 0, manifest


@pytest.mark.slow
def test_editable_wheel_maps_to_the_source_tree(tmp_path):
    """`pip install -e .` (setuptools' editable finder) resolves nemo_btx._conf/_eval to the
    tree's conf/ and eval/. Checked without installing: the editable wheel's finder is loaded
    into an interpreter started without site-packages processing (the venv's own editable
    finder would otherwise answer first)."""
    src, out = tmp_path / "src", tmp_path / "editable"
    shutil.copytree(REPO, src, ignore=_ignore)
    out.mkdir()
    env = clean_env()
    env.pop("PYTHONPATH")
    _run([PY, "-c", f"from setuptools import build_meta as b; b.build_editable({str(out)!r})"], cwd=src, env=env)
    (wheel,) = out.glob("*.whl")
    shutil.unpack_archive(str(wheel), str(out / "site"), format="zip")
    (finder,) = (out / "site").glob("__editable___*_finder.py")
    site_packages = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    probe = (f"import sys; sys.path[:0] = [{str(out / 'site')!r}]; sys.path.append({site_packages!r})\n"
             f"import {finder.stem} as f; f.install()\n"
             "import nemo_btx\nfrom nemo_btx.config.load import conf_dir\nfrom nemo_btx.resources import data_dir\n"
             "print(nemo_btx.__file__, conf_dir(), data_dir('eval'))\n")
    got = _run([PY, "-S", "-c", probe], cwd=tmp_path, env=env).split()
    assert got == [str(src / "nemo_btx" / "__init__.py"), str(src / "conf"), str(src / "eval")]


def test_sdist_carries_conf_and_eval(tmp_path):
    """A wheel built from the sdist (`python -m build`, an index) gets the same files."""
    src, out = tmp_path / "src", tmp_path / "sdist"
    shutil.copytree(REPO, src, ignore=_ignore)
    env = clean_env()
    env.pop("PYTHONPATH")
    _run([PY, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(out)!r})"], cwd=src, env=env)
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in ("conf", "eval"):
        assert {f"{name}/{f}" for f in _data_files(name)} <= names, name
    assert "setup.py" in names and "pyproject.toml" in names
