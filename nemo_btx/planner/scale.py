"""What a model of real size needs that the tiny default does without: the user's corpora, an
imported seed, and nothing capped. Checked for every command before anything runs, so
`experiment=llama2_7b_h100` cannot quietly train a 7B model from scratch on a few MB of toy text.
"""

from __future__ import annotations

import dataclasses

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import ConfigError
from nemo_btx.planner.params import total_params

#: Models from this many parameters on are "real": the toy conveniences are refused.
LARGE = 1e9


def check_scale(cfg: ExperimentConfig) -> None:
    # The seed's size decides (an MoE of small experts is still a small experiment).
    n = total_params(dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, num_experts=None)))
    if n < LARGE:
        return
    size = f"a {n / 1e9:.1f}B-parameter model"
    for i, d in enumerate(cfg.data.domains):
        if d.source == "builtin" and d.prefix is None:
            raise ConfigError(f"data.domains.{i}.source", "builtin",
                              f"the built-in corpora are a few MB of toy text for the tiny model; {size} "
                              f"needs your corpus for '{d.name}': a file, directory or glob of "
                              ".jsonl/.jsonl.gz/.jsonl.zst/.parquet, or data.domains.<i>.prefix= a megatron dataset")
    if cfg.data.max_chars_per_domain is not None:
        raise ConfigError("data.max_chars_per_domain", cfg.data.max_chars_per_domain,
                          f"caps every domain at a toy size; {size} reads all of its data: set it to null")
    if cfg.seed.checkpoint is None and not cfg.seed.from_scratch:
        raise ConfigError("seed.checkpoint", None,
                          f"{size} starts from a pretrained seed: import one (`nemo-btx import-hf "
                          "hf.path=DIR`) and set seed.checkpoint; seed.from_scratch=true pretrains it instead")
