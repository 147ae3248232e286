"""Run the `eval/` task suite through lm-eval, and per-domain held-out perplexity.

lm-eval is driven through `simple_evaluate` with a TaskManager that indexes only `eval/`
(instant, where indexing lm-eval's 14k built-in tasks takes seconds), with `datasets` pointed at
a private cache and told to stay offline when no hub is reachable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import torch

from nemo_btx.resources import data_dir

log = logging.getLogger(__name__)

#: The task directory (btx_gsm8k, btx_humaneval, btx_mmlu): the repository's eval/ (a checkout
#: or an editable install) or the copy a wheel ships as nemo_btx/_eval (nemo_btx/resources.py).
EVAL_DIR = data_dir("eval")
DEFAULT_TASKS = ("btx_gsm8k", "btx_humaneval", "btx_mmlu")


@contextlib.contextmanager
def datasets_sandbox():
    """A throwaway HF_HOME (datasets writes Arrow caches) and offline flags without a hub."""
    from nemo_btx.evaluation.benchmarks import hub_reachable

    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    with tempfile.TemporaryDirectory(prefix="btx-hf-") as home:
        os.environ["HF_HOME"] = home
        if not hub_reachable():
            os.environ["HF_DATASETS_OFFLINE"] = "1"
            os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def task_manager(metadata: Optional[dict] = None, include_path: Optional[str] = None,
                 tasks: Sequence[str] = ()):
    """Indexes eval/ only, unless `tasks` names one of lm-eval's own (then its 14k built-in
    tasks too: about 6 s)."""
    from lm_eval.tasks import TaskManager

    builtin = any(not t.startswith("btx_") for t in tasks)
    return TaskManager(include_path=str(include_path or EVAL_DIR), include_defaults=builtin,
                       metadata=metadata or {})


def run_tasks(lm, tasks: Sequence[str] = DEFAULT_TASKS, *, limit: Optional[float] = None,
              data_dir: Optional[str] = None, log_samples: bool = False) -> dict:
    """lm-eval's results dict (results, groups, configs, versions, n-shot, ...), JSON-clean;
    with data-parallel ranks (`data_parallel.py`), on rank 0 only (None elsewhere).

    Args:
        limit: documents per task (lm-eval's --limit); None = the full sets.
        data_dir: local benchmark data (GSM8K) when no hub is reachable.
    """
    from lm_eval.utils import handle_non_serializable

    with datasets_sandbox():
        tm = task_manager({"data_dir": data_dir} if data_dir else None, tasks=tasks)
        replicas = getattr(lm, "world_size", 1)
        fewest = replicas
        if replicas > 1:
            # lm-eval deals documents to ranks in turn and fails on a rank that gets none ("did
            # not find any docs"): with a task of fewer documents than replicas, replica 0
            # evaluates alone. The tasks are loaded once, here, and simple_evaluate reuses them.
            loaded = tm.load(list(tasks))
            tm.load = lambda _tasks: loaded
            fewest = min((_documents(t, limit) for t in loaded["tasks"].values()), default=replicas)
        if fewest < replicas:
            log.info("a task has %d documents for %d replicas: replica 0 evaluates alone", fewest, replicas)
            results = None
            if lm.rank == 0:
                with lm.alone():
                    results = _evaluate(lm, tasks, tm, limit, log_samples)
            lm.barrier()
        else:
            # with data-parallel replicas: None on every rank but 0
            results = _evaluate(lm, tasks, tm, limit, log_samples)
    return json.loads(json.dumps(results, default=handle_non_serializable))


def _evaluate(lm, tasks, tm, limit, log_samples) -> Optional[dict]:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=tm, limit=limit, log_samples=log_samples,
        confirm_run_unsafe_code=True, verbosity="WARNING", bootstrap_iters=0)


def _documents(task, limit) -> int:
    """Documents lm-eval evaluates of a task (its eval split, cut by `limit` as lm-eval cuts)."""
    from lm_eval.evaluator_utils import get_sample_size

    n = len(task.eval_docs)
    cut = get_sample_size(task, limit)
    return n if cut is None else min(n, cut)


@torch.inference_mode()
def domain_perplexity(scorer, cfg, run_dir, domains: Sequence[str], num_batches: int,
                      micro_batch_size: Optional[int] = None) -> Dict[str, dict]:
    """Mean next-token loss and perplexity of each domain's held-out batches.

    The batches are the training loop's validation batches (`validation_batches`: same data
    seed, same windows), so for a dense checkpoint the loss equals the `valid_loss` its training
    stage recorded, and every model of the run is scored on the same tokens. Under data
    parallelism each rank scores a share of the micro-batches and the sums add up in the order
    one process adds them.
    """
    from nemo_btx.data.loader import validation_batches
    from nemo_btx.evaluation.data_parallel import map_in_order

    mb = micro_batch_size or cfg.train.micro_batch_size
    out = {}
    for domain in domains:
        rows = [r for batch in validation_batches(cfg, run_dir, domain, num_batches) for r in batch.split(mb)]

        def negative_logprob(tokens):
            logp = scorer.logprobs(tokens[:, :-1])
            target = tokens[:, 1:].to(logp.device).unsqueeze(-1)
            return -float(logp.gather(-1, target).sum()), target.numel()

        total, count = 0.0, 0
        for nll, n in map_in_order(negative_logprob, rows):
            total += nll
            count += n
        loss = total / count
        out[domain] = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
        log.info("perplexity %s: %.3f (%d tokens)", domain, math.exp(loss), count)
    return out


def summary(results: dict) -> List[str]:
    """One line per top-level task or group metric (not every MMLU subject), for logs."""
    lines = []
    members = {t for subtasks in (results.get("group_subtasks") or {}).values() for t in subtasks}
    shown = {**(results.get("results") or {}), **(results.get("groups") or {})}
    for task, metrics in sorted(shown.items()):
        if task in members and task not in (results.get("groups") or {}):
            continue
        vals = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k
                and k != "sample_len"}
        lines.append(f"{task}: " + ", ".join(f"{k}={v:.4f}" for k, v in vals.items()))
    return lines
