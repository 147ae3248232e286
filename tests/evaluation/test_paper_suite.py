"""The paper's suite (eval.suite=paper): every new task family through lm-eval on a handful of
local documents (tests/evaluation/paper_data, the eval.data_dir layout), scored by oracles: a
model that gives the references scores 1.0, a constant-answer model the share of that answer.
Also: the shots are the paper's, the task YAMLs still match the lm-eval tasks they copy, and a
task without data is skipped with its reason."""

import json
import re
from pathlib import Path

import pytest
import yaml
from lm_eval.api.model import LM

from nemo_btx.evaluation import benchmarks, hendrycks_math
from nemo_btx.evaluation.runner import EVAL_DIR, run_tasks
from nemo_btx.evaluation.suite import PAPER, PAPER_SHOTS, eval_tasks, suite_tasks

DATA = Path(__file__).with_name("paper_data")


def docs(name):
    split = benchmarks.SOURCES[name].split
    return [json.loads(line) for line in (DATA / name / f"{split}.jsonl").read_text().splitlines()]


def run(lm, task):
    res = run_tasks(lm, [task], data_dir=str(DATA))
    return res["results"][task], res["n-shot"][task]


class _Base(LM):
    def loglikelihood(self, requests, disable_tqdm=False):
        return [(0.0 if self.prefers(*r.args) else -1.0, False) for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        return [self.generate(r.args[0]) for r in requests]


class Chooser(_Base):
    """Multiple choice: prefers the (context, continuation) pairs `prefers` accepts."""

    def __init__(self, prefers):
        super().__init__()
        self.prefers = prefers


class Answerer(_Base):
    """Generation: answers the last question of the prompt with `answer(question)`."""

    def __init__(self, pattern, answer):
        super().__init__()
        self.pattern, self.answer = re.compile(pattern, re.S), answer

    def generate(self, prompt):
        return self.answer(self.pattern.findall(prompt)[-1])


# ----------------------------------------------------------------------------- multiple choice

def _choices(task, doc):
    """(the doc's choices as the task scores them, index of the right one)."""
    if task.startswith("arc"):
        return doc["choices"]["text"], doc["choices"]["label"].index(doc["answerKey"])
    if task == "siqa":
        return [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1
    if task == "piqa":
        return [doc["sol1"], doc["sol2"]], doc["label"]
    blank = doc["sentence"].index("_")  # winogrande: the option fills the context's blank
    return [doc["sentence"][:blank] + o for o in (doc["option1"], doc["option2"])], int(doc["answer"]) - 1


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "siqa", "piqa", "winogrande"])
def test_multiple_choice_oracles(task):
    rows = docs(task)

    def picks(index):  # (context ends with, continuation) of the choice `index(doc)` of each doc
        pairs = set()
        for d in rows:
            choices, answer = _choices(task, d)
            chosen = choices[index(answer)]
            rest = d["sentence"][d["sentence"].index("_") + 1:].strip() if task == "winogrande" else chosen
            pairs.add((chosen if task == "winogrande" else "", rest))
        return lambda ctx, cont: any(ctx.endswith(a) and cont.strip() == b for a, b in pairs)

    scores, shots = run(Chooser(picks(lambda answer: answer)), f"btx_{task}")
    assert scores["acc,none"] == 1.0 and shots == 0 and scores["sample_len"] == len(rows)
    # always the first choice: the share of documents whose answer is the first choice
    share = sum(_choices(task, d)[1] == 0 for d in rows) / len(rows)
    assert 0 < share < 1
    scores, _ = run(Chooser(picks(lambda answer: 0)), f"btx_{task}")
    assert scores["acc,none"] == pytest.approx(share)


# ----------------------------------------------------------------------------------- generation

@pytest.mark.parametrize("task,pattern,answers", [
    ("nq_open", r"Q: (.*?)\?\nA:", lambda d: d["answer"]),
    ("triviaqa", r"Question: (.*?)\?\nAnswer:", lambda d: d["answer"]["aliases"]),
])
def test_open_question_oracles(task, pattern, answers):
    rows = docs(task)
    refs = {d["question"]: answers(d) for d in rows}
    scores, shots = run(Answerer(pattern, lambda q: " " + refs[q][-1] + "\n"), f"btx_{task}")
    assert scores["exact_match,remove_whitespace"] == 1.0 and shots == 5
    constant = answers(rows[0])[0]
    share = sum(constant in answers(d) for d in rows) / len(rows)
    assert 0 < share < 1
    scores, _ = run(Answerer(pattern, lambda q: " " + constant), f"btx_{task}")
    assert scores["exact_match,remove_whitespace"] == pytest.approx(share)


def test_math_oracle():
    rows = docs("math")
    solutions = {d["problem"]: d["solution"] for d in rows}

    def solve(problem):
        answer = hendrycks_math.last_boxed(solutions[problem])
        return f" {solutions[problem]}\nFinal Answer: The final answer is ${answer}$. I hope it is correct.\n"

    scores, shots = run(Answerer(r"Problem:\n(.*?)\n\nSolution:", solve), "btx_math")
    assert scores["exact_match,none"] == 1.0 and shots == 4
    share = sum(hendrycks_math.last_boxed(d["solution"]) == "2" for d in rows) / len(rows)
    assert share == 2 / 6
    scores, _ = run(Answerer(r"Problem:\n(.*?)\n\nSolution:",
                             lambda p: " Easy.\nFinal Answer: The final answer is $2$. I hope it is correct."), "btx_math")
    assert scores["exact_match,none"] == pytest.approx(share)


def test_math_answer_normalization():
    n = hendrycks_math.normalize
    assert n("10 \\text{ inches}") == n("10") == "10"
    assert n("\\frac12") == n("\\frac{1}{2}")
    assert n("\\left( 3, \\frac{\\pi}{2} \\right)") == "\\left(3,\\frac{\\pi}{2}\\right)"  # "ft" stays in \left
    assert n("1,000") == "1000" and n("x = 5") == "5"
    assert hendrycks_math.last_boxed("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert hendrycks_math.extract("no answer here") == ""


def test_mbpp_reference_code_passes_in_the_sandbox():
    rows = docs("mbpp")
    code = {d["text"]: d["code"] for d in rows}
    pattern = r"here is your task: (.*?) Your code should pass"
    scores, shots = run(Answerer(pattern, lambda t: code[t]), "btx_mbpp")
    assert scores["pass@1,sandbox"] == 1.0 and shots == 3
    # a constant program passes only the problem it solves
    scores, _ = run(Answerer(pattern, lambda t: code[rows[0]["text"]]), "btx_mbpp")
    assert scores["pass@1,sandbox"] == pytest.approx(1 / len(rows))


# ------------------------------------------------------------------------------ suite, data, YAMLs

def test_paper_suite_tasks_and_shots():
    from lm_eval.tasks._yaml_loader import load_yaml

    assert suite_tasks("paper") == [t for tasks in PAPER.values() for t in tasks] and len(PAPER_SHOTS) == 12
    assert eval_tasks("paper", ["btx_gsm8k", "hellaswag"]) == [*suite_tasks("paper"), "hellaswag"]
    assert eval_tasks(None, ["btx_gsm8k"]) == ["btx_gsm8k"]
    found = {}
    for path in EVAL_DIR.rglob("btx_*.yaml"):
        data = load_yaml(str(path), resolve_func=False)
        if data.get("task") in PAPER_SHOTS:
            if "include" in data:
                data = {**load_yaml(str(path.parent / data["include"]), resolve_func=False), **data}
            found[data["task"]] = data.get("num_fewshot")
    found["btx_mmlu"] = yaml.safe_load((EVAL_DIR / "mmlu" / "_btx_mmlu_template_yaml")
                                       .read_text().replace("!function", ""))["num_fewshot"]
    assert found == PAPER_SHOTS


def _builtin(rel):
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(f"{lm_eval.__path__[0]}/tasks/{rel}", resolve_func=False)


@pytest.mark.parametrize("ours,theirs", [
    ("arc/btx_arc_easy.yaml", "arc/arc_easy.yaml"), ("siqa/btx_siqa.yaml", "siqa/siqa.yaml"),
    ("piqa/btx_piqa.yaml", "piqa/piqa.yaml"), ("winogrande/btx_winogrande.yaml", "winogrande/default.yaml"),
    ("nq_open/btx_nq_open.yaml", "nq_open/nq_open.yaml"), ("triviaqa/btx_triviaqa.yaml", "triviaqa/default.yaml"),
])
def test_task_yamls_match_lm_eval(ours, theirs):
    from lm_eval.tasks._yaml_loader import load_yaml

    data_keys = {"task", "tag", "dataset_path", "dataset_name", "custom_dataset", "dataset_kwargs",
                 "num_fewshot", "training_split", "validation_split", "test_split"}
    mine = load_yaml(str(EVAL_DIR / ours), resolve_func=False)
    upstream = _builtin(theirs)
    # a !function is a path string here; ours names lm-eval's module by its dotted name
    strip = lambda d: {k: (v.replace("/", ".").split("winogrande.")[-1] if isinstance(v, str) and v.startswith("/") else v)
                       for k, v in d.items() if k not in data_keys}
    assert strip(mine) == strip(upstream)


def test_missing_data_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "SHARED_DATA", tmp_path / "absent")
    monkeypatch.delenv(benchmarks.DATA_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ok, skipped = benchmarks.runnable(suite_tasks("paper") + ["hellaswag"], None, "skip")
    assert ok == ["btx_humaneval", "btx_mmlu"]
    assert "put test.jsonl (fields: problem, solution) under <dir>/math" in skipped["btx_math"]
    assert "reads its data from the hub" in skipped["hellaswag"]
    ok, skipped = benchmarks.runnable(suite_tasks("paper"), str(DATA), "skip")
    assert set(skipped) == {"btx_gsm8k"}
    # a local row without a field the task reads is refused with its line
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(ValueError, match="line 1: no field 'label'"):
        benchmarks.benchmark("piqa", data_dir=str(tmp_path))
