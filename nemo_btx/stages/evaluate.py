"""Stage `eval`: score one model on the lm-eval tasks and on held-out perplexity per domain.

Output: `results.json` — lm-eval's results dict (results, groups, configs, versions, n-shot,
higher_is_better, n-samples) plus a `nemo_btx` section (model name, checkpoints and their
identity, per-domain perplexity, limit, versions). Written atomically.

Models by name (nemo_btx/run_dir.py `RunDir.models`): `seed`, `expert-<domain>`, `btx`
(finetuned, else just mixed), `upcycle-data` / `upcycle-compute` (sparse upcycling), `dense`,
`btm-top1` / `btm-top2` (the ensemble of the experts), `all` (every one that exists); results
go to `<run.dir>/eval/<name>/`. Any other complete checkpoint directory is evaluated into
`<run.dir>/eval/checkpoint-<parent>-<identity>/`.

Results are tied to the checkpoint they came from: `nemo_btx.identity` is the checkpoint's
identity (its marker's unique id; for BTM, that of its experts and settings). A results.json of
the same identity is reused, so a re-submitted job only evaluates what is missing; one of
another identity (the model was retrained) is evaluated again and replaced.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional, Tuple

from nemo_btx.config.schema import ExperimentConfig, expert_domains
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.run_dir import BTM_MODELS, RESULTS, RunDir, checkpoint_identity, combined_identity
from nemo_btx.stages.common import domain_names

log = logging.getLogger(__name__)


def _run_models(cfg: ExperimentConfig):
    return RunDir.of(cfg).models(expert_domains(cfg), cfg.baselines.which)


def checkpoints_of(cfg: ExperimentConfig, name: str) -> List[Path]:
    """The checkpoint(s) behind a model name; BtxError when none is complete yet. No torch:
    `run` and `launch` ask it on a login node."""
    rd = RunDir.of(cfg)
    is_complete = rd.checkpoint_complete
    models = {m.name: m for m in _run_models(cfg)}
    if name not in models:
        path = Path(name)
        if is_complete(path):
            return [path]
        raise ConfigError("eval.model", name, f"one of {', '.join([*models, 'all'])} "
                          "or a complete checkpoint directory")
    model = models[name]
    candidates = [rd.root / c for c in model.checkpoints]
    if model.ensemble:
        missing = [str(p) for p in candidates if not is_complete(p)]
        if missing:
            raise BtxError(f"{name} needs every expert; missing: {', '.join(missing)}")
        return candidates
    for path in candidates:
        if is_complete(path):
            return [path]
    raise BtxError(f"model {name!r}: no complete checkpoint at {', '.join(map(str, candidates))}")


def available(cfg: ExperimentConfig) -> List[str]:
    names = []
    for model in _run_models(cfg):
        try:
            checkpoints_of(cfg, model.name)
        except BtxError:
            continue
        names.append(model.name)
    return names


def identity_of(cfg: ExperimentConfig, name: str, paths: List[Path]) -> str:
    """What the results will be of: the checkpoint's identity (BTM: experts + settings)."""
    ids = [checkpoint_identity(p) for p in paths]
    if name in BTM_MODELS:
        return combined_identity(ids, name, cfg.eval.btm_prior, cfg.eval.btm_routing)
    return ids[0]


def output_dir(cfg: ExperimentConfig, name: str, paths: List[Path], identity: str) -> Path:
    rd = RunDir.of(cfg)
    if name in {m.name for m in _run_models(cfg)}:
        return rd.eval_dir(name)
    return rd.eval_dir_for_checkpoint(paths[0], identity)


def run(cfg: ExperimentConfig) -> None:
    names = available(cfg) if cfg.eval.model == "all" else [cfg.eval.model]
    if not names:
        raise BtxError(f"{cfg.run.dir}: no complete model to evaluate yet")
    try:
        for name in names:
            evaluate_model(cfg, name)
    finally:
        # Once, after every model: the models share one runtime (under torchrun a second
        # init of the process group hangs in the rendezvous; measured).
        from nemo_btx.runtime.distributed import shutdown

        shutdown()


def _existing(out: Path, identity: str) -> Tuple[bool, Optional[str]]:
    """(results of this identity exist, identity of the results there)."""
    from nemo_btx.artifacts import read_json

    if not out.is_file():
        return False, None
    try:
        had = (read_json(out).get("nemo_btx") or {}).get("identity")
    except (OSError, ValueError):
        return False, None
    return had == identity, had


def evaluate_model(cfg: ExperimentConfig, name: str) -> Optional[Path]:
    paths = checkpoints_of(cfg, name)
    identity = identity_of(cfg, name, paths)
    out = output_dir(cfg, name, paths, identity) / RESULTS
    same, had = _existing(out, identity)
    if same:
        log.info("eval %s: complete for this checkpoint (%s), skipping", name, out)
        return out
    if out.is_file():
        log.warning("eval %s: %s holds results of another checkpoint (identity %s, now %s); "
                    "evaluating again", name, out, had, identity)
    start = time.monotonic()
    rd = RunDir.of(cfg)
    lm = build_lm(cfg, name, paths)
    results = {}
    tasks, skipped = runnable_tasks(cfg)
    if tasks:
        from nemo_btx.evaluation.runner import run_tasks

        # Under torchrun every replica scores its share; replica 0 alone gets the results.
        results = run_tasks(lm, tasks, limit=cfg.eval.limit, data_dir=cfg.eval.data_dir)
    perplexity = None
    if cfg.eval.perplexity:
        from nemo_btx.evaluation.runner import domain_perplexity

        eval_cfg = _with_model_shape(cfg, lm)
        perplexity = domain_perplexity(lm.scorer, eval_cfg, rd.root, domain_names(cfg),
                                       cfg.eval.perplexity_batches or cfg.data.eval_iters)
    from nemo_btx.evaluation.data_parallel import is_writer

    if is_writer():
        _write(cfg, name, paths, identity, out, results, perplexity, tasks, skipped, start, lm.world_size)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # every rank goes on once the results are there
    return out


def _write(cfg, name, paths, identity, out, results, perplexity, tasks, skipped, start, ranks) -> None:
    from nemo_btx.artifacts import software_versions, write_json_atomic
    from nemo_btx.evaluation.runner import summary

    results = results or {}
    results["nemo_btx"] = {
        "model": name, "checkpoints": [str(p) for p in paths], "identity": identity,
        "perplexity": perplexity, "limit": cfg.eval.limit, "tasks": list(tasks), "skipped_tasks": skipped,
        "seconds": time.monotonic() - start, "data_parallel_ranks": ranks,
        "layout": {k: getattr(cfg.parallel, k) for k in ("tp", "pp", "ep")},
        "btm": {"prior": cfg.eval.btm_prior, "routing": cfg.eval.btm_routing} if name in BTM_MODELS else None,
        "versions": software_versions(), "complete": True}
    write_json_atomic(out, results)
    for line in summary(results):
        log.info("eval %s: %s", name, line)
    if perplexity:
        log.info("eval %s: perplexity %s", name, {d: round(v["perplexity"], 3) for d, v in perplexity.items()})
    log.info("eval %s: wrote %s (%.0f s, %d data-parallel rank%s)", name, out, time.monotonic() - start,
             ranks, "s" if ranks > 1 else "")


def runnable_tasks(cfg: ExperimentConfig):
    from nemo_btx.evaluation.benchmarks import runnable
    from nemo_btx.evaluation.suite import eval_tasks

    return runnable(eval_tasks(cfg.eval.suite, cfg.eval.tasks), cfg.eval.data_dir, cfg.eval.missing_data)


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
    common = dict(batch_size=cfg.eval.batch_size, gen_cap=cfg.eval.max_gen_toks,
                  gen_batch_size=cfg.eval.gen_batch_size, layout=cfg.parallel)
    root = str(RunDir.of(cfg).root)
    if name in BTM_MODELS:
        from nemo_btx.evaluation.btm import BTMLM

        return BTMLM(experts="|".join(map(str, paths)), top_k=int(name[-1]), run_dir=root,
                     prior=cfg.eval.btm_prior, routing=cfg.eval.btm_routing,
                     domains="|".join(expert_domains(cfg)), **common)
    from nemo_btx.evaluation.lm import NemoBtxLM

    return NemoBtxLM(str(paths[0]), run_dir=root, **common)


def is_current(cfg: ExperimentConfig, name: str) -> bool:
    """Whether the model's results exist and are of its current checkpoint (what `run` and
    `launch` ask before they schedule an evaluation again)."""
    try:
        paths = checkpoints_of(cfg, name)
        identity = identity_of(cfg, name, paths)
    except (BtxError, OSError):
        return False
    return _existing(output_dir(cfg, name, paths, identity) / RESULTS, identity)[0]
