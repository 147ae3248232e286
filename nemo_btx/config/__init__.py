"""Configuration: schema (dataclasses), composition (Hydra) and validation. No torch here."""

from nemo_btx.config.load import load_config, to_yaml, from_yaml
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.config.validate import validate

__all__ = ["ExperimentConfig", "load_config", "to_yaml", "from_yaml", "validate"]
