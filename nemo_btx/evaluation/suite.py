"""Named task suites (`eval.suite`), grouped by domain the way the report's Table 2 groups them.

`paper` is the BTX paper's evaluation (Sukhbaatar et al., 2024, Table 2, which follows Llama 2's
protocol): the shots are each task's `num_fewshot` in eval/ (tests/evaluation/test_suite.py
checks them against `PAPER_SHOTS`). Light: no lm-eval import, so the report and `run` read it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

#: domain -> tasks, in the paper's column order.
PAPER: Dict[str, Tuple[str, ...]] = {
    "math": ("btx_gsm8k", "btx_math"),
    "code": ("btx_humaneval", "btx_mbpp"),
    "world knowledge": ("btx_nq_open", "btx_triviaqa"),
    "reasoning": ("btx_arc_easy", "btx_arc_challenge", "btx_siqa", "btx_piqa", "btx_winogrande"),
    "general": ("btx_mmlu",),
}

#: The paper's shots per task (HumanEval and MBPP are pass@1, greedy).
PAPER_SHOTS: Dict[str, int] = {
    "btx_gsm8k": 8, "btx_math": 4, "btx_humaneval": 0, "btx_mbpp": 3, "btx_nq_open": 5,
    "btx_triviaqa": 5, "btx_arc_easy": 0, "btx_arc_challenge": 0, "btx_siqa": 0, "btx_piqa": 0,
    "btx_winogrande": 0, "btx_mmlu": 5,
}

SUITES: Dict[str, Dict[str, Tuple[str, ...]]] = {"paper": PAPER}


def suite_tasks(suite: Optional[str]) -> List[str]:
    return [t for tasks in SUITES[suite].values() for t in tasks] if suite else []


def eval_tasks(suite: Optional[str], tasks: Sequence[str]) -> List[str]:
    """What `eval` runs: the suite's tasks, then those of `eval.tasks` it does not hold."""
    chosen = suite_tasks(suite)
    return chosen + [t for t in tasks if t not in chosen]


def domain_of(task: str) -> Optional[str]:
    """The paper's domain of a task (None: not in the paper's suite)."""
    return next((d for d, tasks in PAPER.items() if task in tasks), None)
