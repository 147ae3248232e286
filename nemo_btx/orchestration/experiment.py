"""One run directory, one experiment: the resolved config a run directory holds, and the check
that `run` and `launch` make before adding results to it."""

from __future__ import annotations

from pathlib import Path
from typing import List

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import ConfigError
from nemo_btx.run_dir import RunDir

#: Keys that say where and how stages run, not what they compute: a run directory accepts a
#: change of these (layouts, the run dir's own path, the cluster, logging, Hugging Face
#: import/export paths, the HF merge's thread count).
WHERE_AND_HOW = ("run.", "cluster.", "hf.", "train.log_interval", "mix.threads", "logging.", "plan.")


def preflight(cfg: ExperimentConfig) -> None:
    """What the whole experiment needs decided before its first stage starts (`run`, `launch`),
    beyond the config checks every command makes: the merge recipes of `mix` and `upcycle`
    (days of expert training must not end in a bad mix.average_weights) and the benchmark
    data of the evaluation. No torch."""
    from nemo_btx.evaluation.benchmarks import runnable
    from nemo_btx.evaluation.suite import eval_tasks
    from nemo_btx.mixing.recipe import mix_recipe, upcycle_recipe
    from nemo_btx.model.agreement import check_seed
    from nemo_btx.run_dir import baseline

    check_seed(cfg)
    mix_recipe(cfg)
    if any(baseline(b).moe for b in cfg.baselines.which):
        upcycle_recipe(cfg)
    if cfg.eval.missing_data == "error":  # (a task to skip is said when the evaluation runs)
        runnable(eval_tasks(cfg.eval.suite, cfg.eval.tasks), cfg.eval.data_dir, cfg.eval.missing_data)


def check_same_experiment(cfg: ExperimentConfig, rd: Path, redo: bool) -> None:
    """Refuse to mix results of another config into `rd`; record this config there.

    `redo` (--from/--only): the user said what to redo, so the new config is accepted."""
    from omegaconf import OmegaConf

    from nemo_btx.artifacts import write_text_atomic
    from nemo_btx.config import to_yaml

    saved_path = RunDir(rd).config
    text = to_yaml(cfg)
    if saved_path.is_file() and not redo:
        saved = OmegaConf.to_container(OmegaConf.create(saved_path.read_text()))
        now = OmegaConf.to_container(OmegaConf.create(text))
        diff = [k for k in sorted(_diff(saved, now)) if not k.startswith(WHERE_AND_HOW)]
        if diff:
            raise ConfigError(diff[0], "changed", f"{rd} holds an experiment with another config "
                              f"(differs in {', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}); "
                              "use another run.dir, or --from STAGE to redo from a stage with this config")
    write_text_atomic(saved_path, text)


def _diff(a, b, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
