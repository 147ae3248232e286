"""Stage `eval`: score one model of the run directory on the lm-eval tasks and on held-out
perplexity per domain.

Output: `<run.dir>/eval/<model>/results.json` — lm-eval's results dict (results, groups,
configs, versions, n-shot, higher_is_better, n-samples) plus a `nemo_btx` section (model name,
checkpoints, per-domain perplexity, limit, versions). Written atomically; a model whose
results.json exists is skipped, so a re-submitted job only evaluates what is missing.

Models by name: `seed`, `expert-<domain>`, `btx` (finetuned, else just mixed),
`upcycle-data` / `upcycle-compute` (the sparse-upcycling baselines), `dense`, `btm-top1` / `btm-top2` (the ensemble of the experts), `all` (every one that exists),
or a checkpoint directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.stages.common import domain_names, run_dir

log = logging.getLogger(__name__)


def candidates(cfg: ExperimentConfig) -> Dict[str, List[Path]]:
    """Model name -> checkpoint directories in preference order (BTM: all experts)."""
    root = run_dir(cfg)
    out: Dict[str, List[Path]] = {"seed": [root / "seed" / "weights"]}
    for d in domain_names(cfg):
        out[f"expert-{d}"] = [root / "experts" / d / "weights"]
    out["btx"] = [root / "btx" / "finetuned" / "weights", root / "btx" / "mixed" / "weights",
                  root / "btx" / "mixed"]
    out["upcycle-data"] = [root / "baselines" / "upcycle" / "data_matched" / "weights"]
    out["upcycle-compute"] = [root / "baselines" / "upcycle" / "compute_matched" / "weights"]
    out["dense"] = [root / "baselines" / "dense" / "weights"]
    return out


def checkpoints_of(cfg: ExperimentConfig, name: str) -> List[Path]:
    """The checkpoint(s) behind a model name; BtxError when none is complete yet."""
    from nemo_btx.training.checkpoint import is_complete

    if name in ("btm-top1", "btm-top2"):
        experts = [run_dir(cfg) / "experts" / d / "weights" for d in domain_names(cfg)]
        missing = [str(p) for p in experts if not is_complete(p)]
        if missing:
            raise BtxError(f"{name} needs every expert; missing: {', '.join(missing)}")
        return experts
    table = candidates(cfg)
    if name not in table:
        path = Path(name)
        if is_complete(path):
            return [path]
        raise ConfigError("eval.model", name, f"one of {', '.join([*table, 'btm-top1', 'btm-top2', 'all'])} "
                          "or a complete checkpoint directory")
    for path in table[name]:
        if is_complete(path):
            return [path]
    raise BtxError(f"model {name!r}: no complete checkpoint at {', '.join(map(str, table[name]))}")


def available(cfg: ExperimentConfig) -> List[str]:
    names = []
    for name in [*candidates(cfg), "btm-top1", "btm-top2"]:
        try:
            checkpoints_of(cfg, name)
        except BtxError:
            continue
        names.append(name)
    return names


def output_dir(cfg: ExperimentConfig, name: str) -> Path:
    label = name if not Path(name).is_absolute() and "/" not in name else Path(name).parent.name or "custom"
    return run_dir(cfg) / "eval" / label


def run(cfg: ExperimentConfig) -> None:
    names = available(cfg) if cfg.eval.model == "all" else [cfg.eval.model]
    if not names:
        raise BtxError(f"{run_dir(cfg)}: no complete model to evaluate yet")
    for name in names:
        evaluate_model(cfg, name)


def evaluate_model(cfg: ExperimentConfig, name: str) -> Optional[Path]:
    from nemo_btx.artifacts import software_versions, write_json_atomic

    out = output_dir(cfg, name) / "results.json"
    if out.is_file():
        log.info("eval %s: complete (%s), skipping", name, out)
        return out
    paths = checkpoints_of(cfg, name)
    start = time.monotonic()
    lm = build_lm(cfg, name, paths)
    try:
        results = {}
        tasks, skipped = runnable_tasks(cfg)
        if tasks:
            from nemo_btx.evaluation.runner import run_tasks

            results = run_tasks(lm, tasks, limit=cfg.eval.limit, data_dir=cfg.eval.data_dir)
        perplexity = None
        if cfg.eval.perplexity:
            from nemo_btx.evaluation.runner import domain_perplexity

            eval_cfg = _with_model_shape(cfg, lm)
            perplexity = domain_perplexity(lm.scorer, eval_cfg, run_dir(cfg), domain_names(cfg),
                                           cfg.eval.perplexity_batches or cfg.data.eval_iters)
    finally:
        from nemo_btx.runtime.distributed import shutdown

        shutdown()
    results["nemo_btx"] = {
        "model": name, "checkpoints": [str(p) for p in paths], "perplexity": perplexity,
        "limit": cfg.eval.limit, "tasks": list(tasks), "skipped_tasks": skipped,
        "seconds": time.monotonic() - start,
        "btm": {"prior": cfg.eval.btm_prior, "routing": cfg.eval.btm_routing} if name.startswith("btm") else None,
        "versions": software_versions(), "complete": True}
    write_json_atomic(out, results)
    from nemo_btx.evaluation.runner import summary

    for line in summary(results):
        log.info("eval %s: %s", name, line)
    if perplexity:
        log.info("eval %s: perplexity %s", name, {d: round(v["perplexity"], 3) for d, v in perplexity.items()})
    log.info("eval %s: wrote %s (%.0f s)", name, out, time.monotonic() - start)
    return out


def runnable_tasks(cfg: ExperimentConfig):
    from nemo_btx.evaluation.benchmarks import runnable

    return runnable(cfg.eval.tasks, cfg.eval.data_dir, cfg.eval.missing_data)


def _with_model_shape(cfg: ExperimentConfig, lm) -> ExperimentConfig:
    """Validation batches follow the evaluated model's sequence length (a checkpoint adopted
    with a different one still reads windows it can score)."""
    import copy

    scorer = lm.scorer
    first = scorer.experts[0] if hasattr(scorer, "experts") else scorer
    eval_cfg = copy.deepcopy(cfg)
    eval_cfg.model = first.model_cfg
    return eval_cfg


def build_lm(cfg: ExperimentConfig, name: str, paths: List[Path]):
    """The lm-eval model for a resolved name (one checkpoint, or the BTM ensemble)."""
    common = dict(batch_size=cfg.eval.batch_size, gen_cap=cfg.eval.max_gen_toks)
    if name.startswith("btm-"):
        from nemo_btx.evaluation.btm import BTMLM

        return BTMLM(experts="|".join(map(str, paths)), top_k=int(name[-1]), run_dir=str(run_dir(cfg)),
                     prior=cfg.eval.btm_prior, routing=cfg.eval.btm_routing,
                     domains="|".join(domain_names(cfg)), **common)
    from nemo_btx.evaluation.lm import NemoBtxLM

    return NemoBtxLM(str(paths[0]), run_dir=str(run_dir(cfg)), **common)
