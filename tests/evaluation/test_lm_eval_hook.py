"""The plain `lm_eval` command of this venv, with the `.pth` hook `make install` writes, finds
lm-eval's own models (`--model hf` evaluates a tiny local Llama) and ours (`--model nemo-btx`
reaches our model class); and the hook keeps lm-eval's models whatever is imported first.

lm-eval 0.4.13 imports `lm_eval.models` (which registers its own models) only while its model
registry is empty, so a hook that registered ours into the empty registry hid all of lm-eval's:
"no model for this name found! Supported model names: nemo-btx, nemo-btx-btm".
"""

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env
from nemo_btx.evaluation.harness import PTH_NAME

sys.path.insert(0, str(REPO / "tests" / "hf"))
from hf_models import make_llama  # noqa: E402

LM_EVAL = Path(sys.executable).parent / "lm_eval"
NOT_FOUND = "no model for this name found"

TASK = """task: hook_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["yes", "no"]
doc_to_target: answer
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def _env(tmp_path):
    return clean_env(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                     TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow
def test_plain_lm_eval_finds_hf_and_nemo_btx(tmp_path):
    hook = Path(site.getsitepackages()[0]) / PTH_NAME
    assert hook.is_file(), f"{hook} missing: `make install` writes it (harness.install_pth)"
    assert LM_EVAL.is_file(), f"{LM_EVAL} missing: lm-eval is in the eval extra"
    make_llama(tmp_path / "llama", max_shard_size="10MB", max_position_embeddings=512)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text('{"question": "Is the cat on the mat?", "answer": 0}\n'
                                      '{"question": "Is 2 + 2 = 5?", "answer": 1}\n')
    (tasks / "hook_check.yaml").write_text(TASK.format(docs=tasks / "docs.jsonl"))
    common = ["--tasks", "hook_check", "--include_path", str(tasks), "--limit", "1"]
    missing = tmp_path / "no-checkpoint"
    # Both at once: each spends most of its time importing lm-eval.
    procs = {
        "hf": subprocess.Popen(
            [str(LM_EVAL), "run", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'llama'},dtype=float32",
             "--device", "cpu", "--output_path", str(tmp_path / "out"), *common],
            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "nemo-btx": subprocess.Popen(
            [str(LM_EVAL), "run", "--model", "nemo-btx", "--model_args", f"checkpoint={missing}", *common],
            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    out = {name: (p.communicate(timeout=300), p.returncode) for name, p in procs.items()}

    (hf_out, hf_err), hf_rc = out["hf"]
    assert hf_rc == 0 and NOT_FOUND not in hf_err, hf_err[-4000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    res = json.loads(results.read_text())
    assert res["config"]["model"] == "hf" and "acc,none" in res["results"]["hook_check"]

    # Ours is found and built: it fails only on the missing checkpoint, inside our model class.
    (_, ours_err), ours_rc = out["nemo-btx"]
    assert ours_rc != 0 and NOT_FOUND not in ours_err, ours_err[-4000:]
    assert f"CheckpointError: {missing}: no such checkpoint directory" in ours_err, ours_err[-4000:]
    assert "nemo_btx/evaluation/model.py" in ours_err


def test_hook_keeps_lm_eval_models_when_models_are_imported_first(tmp_path):
    """`import lm_eval.models` before the registry: the hook runs inside that import."""
    code = ("import nemo_btx.evaluation.lm_eval_hook as h; h.install()\n"
            "import lm_eval.models\n"
            "from lm_eval.api.registry import model_registry as r\n"
            "from nemo_btx.evaluation.harness import MODELS\n"
            "assert set(lm_eval.models.MODEL_MAPPING) | set(MODELS) == set(r.keys()), sorted(r.keys())\n"
            "assert r._objs['nemo-btx'] == MODELS['nemo-btx'] and r._objs['hf'] == lm_eval.models.MODEL_MAPPING['hf']\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
