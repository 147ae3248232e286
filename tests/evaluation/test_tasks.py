"""The eval/ tasks through lm-eval, scored with oracle models whose right answer is known:
GSM8K reference answers score exact match 1.0, an always-"B" model scores the share of B
answers on MMLU, canonical HumanEval solutions score pass@1 = 1.0 through the sandbox filter;
and our task YAMLs still match the lm-eval ones they copy. Also the lm-eval command line with
our models registered."""

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from lm_eval.api.model import LM

from conftest import REPO, clean_env
from eval_fixtures import eval_run  # noqa: F401 - fixture
from nemo_btx.evaluation import benchmarks, humaneval
from nemo_btx.evaluation.runner import EVAL_DIR, run_tasks

needs_gsm8k = pytest.mark.skipif(benchmarks.data_dir() is None or not (benchmarks.data_dir() / "gsm8k").is_dir(),
                                 reason="GSM8K data not found (shared/data/gsm8k or $NEMO_BTX_EVAL_DATA)")


class _Oracle(LM):
    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


class AlwaysB(_Oracle):
    def loglikelihood(self, requests, disable_tqdm=False):
        return [(0.0 if r.args[1].strip() == "B" else -1.0, False) for r in requests]


class GSM8KOracle(_Oracle):
    """Answers each question with its reference solution, in the CoT format the task extracts."""

    def __init__(self):
        super().__init__()
        self.answers = {r["question"]: r["answer"] for r in benchmarks.gsm8k()["test"]}

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for r in requests:
            question = r.args[0].rsplit("Q: ", 1)[1].rsplit("\nA:", 1)[0]
            rationale, number = self.answers[question].split("####")
            rationale = re.sub(r"<<[^>]*>>", "", rationale).strip().replace("\n", " ")
            out.append(f" {rationale} The answer is {number.strip()}.\n\n")
        return out


class HumanEvalOracle(_Oracle):
    """Canonical solutions, except `wrong` problems get a body that returns None."""

    def __init__(self, wrong=()):
        super().__init__()
        self.solutions = {p["prompt"]: p["canonical_solution"] for p in humaneval.load_problems()}
        self.wrong = {p["prompt"] for p in humaneval.load_problems() if p["task_id"] in wrong}

    def generate_until(self, requests, disable_tqdm=False):
        return ["    return None\n" if r.args[0] in self.wrong else self.solutions[r.args[0]]
                for r in requests]


@needs_gsm8k
@pytest.mark.timeout(300)
def test_gsm8k_reference_answers_score_one():
    res = run_tasks(GSM8KOracle(), ["btx_gsm8k"], limit=150)
    r = res["results"]["btx_gsm8k"]
    assert r["sample_len"] == 150
    assert r["exact_match,strict-match"] == 1.0 and r["exact_match,flexible-extract"] == 1.0
    assert res["n-shot"]["btx_gsm8k"] == 8


@pytest.mark.timeout(300)
def test_mmlu_always_b_scores_the_share_of_b():
    limit = 4
    res = run_tasks(AlwaysB(), ["btx_mmlu"], limit=limit)
    tests = benchmarks._mmlu_test()
    assert len(tests) == 57 and sum(map(len, tests.values())) == 14042
    for subject, rows in tests.items():
        share = sum(r["answer"] == 1 for r in rows[:limit]) / limit
        assert res["results"][f"btx_mmlu_{subject}"]["acc,none"] == pytest.approx(share), subject
    first = [r for rows in tests.values() for r in rows[:limit]]
    assert res["groups"]["btx_mmlu"]["acc,none"] == pytest.approx(sum(r["answer"] == 1 for r in first) / len(first))
    assert res["n-shot"]["btx_mmlu_anatomy"] == 5 and res["n-shot"]["btx_mmlu_college_chemistry"] == 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mmlu_always_b_on_forty_questions_per_subject():
    """The first 40 questions of every subject (2,280 of the 14,042; the whole set took 67 s):
    the group's accuracy is the share of B among them, so each subject's documents, answers and
    the size-weighted group mean line up."""
    res = run_tasks(AlwaysB(), ["btx_mmlu"], limit=40)
    answers = Counter(r["answer"] for rows in benchmarks._mmlu_test().values() for r in rows[:40])
    assert sum(answers.values()) > 2000
    assert res["groups"]["btx_mmlu"]["acc,none"] == pytest.approx(answers[1] / sum(answers.values()))


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_humaneval_canonical_solutions_score_one_through_lm_eval():
    res = run_tasks(HumanEvalOracle(), ["btx_humaneval"])
    assert res["results"]["btx_humaneval"]["sample_len"] == 164
    assert res["results"]["btx_humaneval"]["pass@1,sandbox"] == 1.0
    # every third problem wrong: the score must drop by exactly those (outcomes stay aligned)
    wrong = {p["task_id"] for i, p in enumerate(humaneval.load_problems()) if i % 3 == 0}
    res = run_tasks(HumanEvalOracle(wrong), ["btx_humaneval"], limit=30)
    assert res["results"]["btx_humaneval"]["pass@1,sandbox"] == pytest.approx(20 / 30)


def test_mmlu_dev_exemplars_and_subjects():
    dev = benchmarks._mmlu_dev()
    assert set(dev) == set(benchmarks._mmlu_test())
    assert {s: len(v) for s, v in dev.items() if len(v) != 5} == {
        "college_chemistry": 3, "formal_logic": 4, "human_aging": 4}
    for rows in dev.values():
        for r in rows:
            assert r["question"] and len(r["choices"]) == 4 and 0 <= r["answer"] < 4


def _builtin(rel):
    from lm_eval.tasks._yaml_loader import load_yaml
    import lm_eval

    return load_yaml(f"{lm_eval.__path__[0]}/tasks/{rel}", resolve_func=False)


def test_task_yamls_match_lm_eval():
    """btx_gsm8k is gsm8k-cot, btx_mmlu_* are mmlu/default, apart from the data keys."""
    from lm_eval.tasks._yaml_loader import load_yaml

    data_keys = {"task", "dataset_path", "dataset_name", "custom_dataset", "tag", "dataset_kwargs",
                 "task_alias", "include", "num_fewshot"}
    ours = load_yaml(EVAL_DIR / "gsm8k" / "btx_gsm8k.yaml", resolve_func=False)
    theirs = _builtin("gsm8k/gsm8k-cot.yaml")
    assert {k: v for k, v in ours.items() if k not in data_keys} == \
        {k: v for k, v in theirs.items() if k not in data_keys}
    assert ours["num_fewshot"] == theirs["num_fewshot"] == 8
    template = yaml.safe_load((EVAL_DIR / "mmlu" / "_btx_mmlu_template_yaml").read_text().replace("!function", ""))
    builtin_template = _builtin("mmlu/default/_default_template_yaml")
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "metric_list", "fewshot_config",
                "output_type", "test_split", "fewshot_split"):
        assert template[key] == builtin_template[key], key
    import lm_eval

    for path in sorted((EVAL_DIR.parent / "eval" / "mmlu").glob("btx_mmlu_*.yaml")):
        subject = path.stem[len("btx_mmlu_"):]
        mine = yaml.safe_load(path.read_text())
        upstream = _builtin(f"mmlu/default/mmlu_{subject}.yaml")
        assert mine["description"] == upstream["description"]
        assert mine["tag"] == "btx_" + upstream["tag"]
    assert len(list((EVAL_DIR / "mmlu").glob("btx_mmlu_*.yaml"))) == 57
    assert lm_eval.__version__.startswith("0.4.")


def _lm_eval_cli(args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_lm_eval_command_line_runs_our_model(eval_run, tmp_path):  # noqa: F811
    ckpt = eval_run / "seed" / "weights"
    common = ["--model", "nemo-btx", "--model_args", f"checkpoint={ckpt},gen_cap=8",
              "--tasks", "btx_mmlu_anatomy", "--limit", "2", "--output_path", str(tmp_path / "out")]
    out = _lm_eval_cli(["-m", "nemo_btx.evaluation.harness", "run", *common])
    assert "anatomy" in out
    # plain `lm_eval` with the .pth hook (site.addsitedir processes .pth files as site-packages would)
    code = ("import site, sys; from nemo_btx.evaluation.harness import install_pth; "
            f"site.addsitedir(str(install_pth({str(tmp_path)!r}).parent)); "
            "from lm_eval.__main__ import cli_evaluate; sys.argv = ['lm_eval', *sys.argv[1:]]; cli_evaluate()")
    out = _lm_eval_cli(["-c", code, "run", *common, "--include_path", str(EVAL_DIR)])
    assert "anatomy" in out
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results and json.loads(results[0].read_text())["results"]["btx_mmlu_anatomy"]["sample_len"] == 2
