"""MBPP: lm-eval's 3-shot prompt, each completion run against the problem's asserts in the same
sandbox as HumanEval (nemo_btx/evaluation/sandbox.py).

lm-eval's own mbpp task scores with Hugging Face `evaluate`'s code_eval, which it loads from the
hub while the task is parsed and which runs the code in the evaluating process; here the check
program is what code_eval would run (completion, then the tests), run as hostile code.
"""

from __future__ import annotations

from typing import Dict, List

from nemo_btx.evaluation.humaneval import execute_grouped


def check_program(problem: Dict, completion: str) -> str:
    """The program whose clean exit means the completion passes every test of the problem."""
    setup = problem.get("test_setup_code") or ""
    return "\n".join([completion, setup, *problem["test_list"]]) + "\n"


def execute_responses(resps: List[List[str]], docs: List[Dict]) -> List[List[Dict]]:
    """lm-eval filter: every (problem, completion) in the sandbox, all problems at once."""
    return execute_grouped(resps, docs, check_program)
