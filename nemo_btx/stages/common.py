"""Small helpers the training stages share: domains and preconditions.

(Stages never import each other; what they share lives here or in the library. Paths come from
`nemo_btx.run_dir`.)
"""

from __future__ import annotations

from typing import List, Optional

from nemo_btx.config.schema import ExperimentConfig, expert_domains
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.run_dir import MANIFEST, RunDir


def domain_names(cfg: ExperimentConfig) -> List[str]:
    return [d.name for d in cfg.data.domains]


def domain_weights(cfg: ExperimentConfig, names: Optional[List[str]] = None) -> List[float]:
    by_name = {d.name: d.weight for d in cfg.data.domains}
    return [by_name[n] for n in (names or domain_names(cfg))]


def require_data(cfg: ExperimentConfig) -> None:
    """Training needs the data stage's output for every domain; say which command makes it."""
    rd = RunDir.of(cfg)
    missing = [d for d in domain_names(cfg) if not rd.data_manifest(d).is_file()]
    if missing:
        raise BtxError(f"{rd.data}: no complete data for {', '.join(missing)} ({MANIFEST} missing); "
                       f"run `nemo-btx data run.dir={cfg.run.dir}` first")


def resolve_domain(cfg: ExperimentConfig) -> str:
    """`domain=NAME` or `domain_index=I` (a Slurm array task id) -> an expert domain's name."""
    names = expert_domains(cfg)
    if cfg.domain is not None and cfg.domain_index is not None:
        if not 0 <= cfg.domain_index < len(names) or names[cfg.domain_index] != cfg.domain:
            raise ConfigError("domain_index", cfg.domain_index,
                              f"disagrees with domain={cfg.domain!r}; give one of them")
    if cfg.domain is not None:
        if cfg.domain not in names:
            raise ConfigError("domain", cfg.domain, f"must be one of {', '.join(names)}")
        return cfg.domain
    if cfg.domain_index is not None:
        if not 0 <= cfg.domain_index < len(names):
            raise ConfigError("domain_index", cfg.domain_index,
                              f"must be between 0 and {len(names) - 1} ({', '.join(names)})")
        return names[cfg.domain_index]
    raise ConfigError("domain", None, f"train-expert needs domain=NAME or domain_index=I "
                      f"(domains: {', '.join(names)})")


def expert_table(cfg: ExperimentConfig) -> str:
    """Validation perplexity per domain of the seed and each finished expert (Markdown).

    The paper's Table 1 pattern on a small scale: each expert should beat the seed on its own
    domain and lose ground on the others (forgetting).
    """
    import json
    import math

    rd = RunDir.of(cfg)
    names = domain_names(cfg)
    rows = [("seed", rd.seed)] + [(f"expert:{d}", rd.expert(d)) for d in names]
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, path in rows:
        if not rd.complete(path):
            continue
        valid = json.loads((path / MANIFEST).read_text()).get("valid_loss") or {}
        cells = [f"{math.exp(valid[d]):.2f}" if d in valid else "-" for d in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_on(scfg: ExperimentConfig, job):
    """Run one training job: runtime up, the job's domains as data (mixed by `job.weights`),
    its evaluation domains' validation batches, the loop, runtime down. Returns the runtime."""
    from nemo_btx.data.loader import TrainData, validation_batches
    from nemo_btx.runtime.distributed import init_runtime, shutdown
    from nemo_btx.training.loop import run_training

    rt = init_runtime(scfg)
    root = RunDir.of(scfg).root
    try:
        data = TrainData(scfg, root, job.domains, job.weights)
        valid = {d: validation_batches(scfg, root, d, scfg.data.eval_iters) for d in job.eval_domains}
        run_training(scfg, job, rt, data.global_batch, valid)
    finally:
        shutdown()
    return rt
