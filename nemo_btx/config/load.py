"""Compose `conf/` YAML with NeMo-style `key=value` overrides into a typed `ExperimentConfig`.

Hydra does the composition (config groups such as `model=llama2_7b`, presets such as
`experiment=llama2_7b_h100`, `key=value` overrides); the structured schema makes it strict.
Hydra's own messages are long and nested, so overrides are checked against the schema first and
every remaining failure is re-raised as one `ConfigError` line naming the key.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.errors import ConfigError

SCHEMA_NAME = "btx_schema"
#: Config groups whose value selects a YAML file under conf/<group>/.
GROUPS = ("model", "parallel", "train", "experiment")


def conf_dir() -> Path:
    """The YAML directory: $NEMO_BTX_CONF_DIR, else the repository's conf/ (a checkout or an
    editable install) or the copy a wheel ships as nemo_btx/_conf (see nemo_btx/resources.py)."""
    from nemo_btx.resources import data_dir

    env = os.environ.get("NEMO_BTX_CONF_DIR")
    path = Path(env) if env else data_dir("conf")
    if not (path / "config.yaml").is_file():
        raise ConfigError("NEMO_BTX_CONF_DIR", str(path), "must be a directory holding config.yaml")
    return path


def group_options(group: str, root: Optional[Path] = None) -> List[str]:
    root = root or conf_dir()
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def _schema_node(key: str, value=None) -> bool:
    """Walk the dataclass schema along a dotted key; raise ConfigError for an unknown part.

    List-of-section fields (data.domains) accept an index: `data.domains.0.weight`. Mapping
    fields (expert.tokens) accept any name below them: True is returned for such a key (Hydra
    must be told to add it).
    """
    node = ExperimentConfig
    parts = key.split(".")
    depth = 0
    while depth < len(parts):
        part = parts[depth]
        names = [f.name for f in fields(node)]
        if part not in names:
            where = ".".join(parts[:depth]) or "the top level"
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"did you mean '{'.'.join(parts[:depth] + close)}'? " if close else ""
            raise ConfigError(key, value, f"unknown key; {hint}keys at {where}: {', '.join(names)}")
        spec = next(f for f in fields(node) if f.name == part)
        default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
        depth += 1
        if depth == len(parts):
            return False
        if isinstance(default, dict):
            if depth + 1 != len(parts):
                raise ConfigError(key, value, f"'{'.'.join(parts[:depth])}' maps names to values: "
                                  f"{'.'.join(parts[:depth])}.<name>=<value>")
            return True
        if isinstance(default, list) and default and is_dataclass(default[0]):
            if not parts[depth].isdigit():
                raise ConfigError(key, value, f"'{'.'.join(parts[:depth])}' is a list: "
                                  f"index it, e.g. {'.'.join(parts[:depth])}.0.{parts[depth]}")
            depth += 1
            if depth == len(parts):
                return False
            default = default[0]
        if not is_dataclass(default):
            raise ConfigError(key, value, f"'{'.'.join(parts[:depth])}' is a value, not a section")
        node = type(default)


def check_overrides(overrides: Sequence[str]) -> List[str]:
    """Reject unknown keys and unknown group options with a suggestion, before Hydra runs.
    Returns the overrides as Hydra takes them (a mapping entry is added or replaced: ++key)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    out = []
    for text in overrides:
        if "=" not in text:
            raise ConfigError(text, "", "overrides are key=value (e.g. model.num_layers=4)")
        try:
            (ov,) = OverridesParser.create().parse_overrides([text])
        except HydraException as err:
            key = text.split("=", 1)[0]
            raise ConfigError(key, text.split("=", 1)[1], f"cannot parse: {str(err).splitlines()[0]}") from None
        key = ov.key_or_group.lstrip("+~")
        if key in GROUPS and isinstance(ov.value(), str):
            options = group_options(key)
            if ov.value() not in options:
                raise ConfigError(key, ov.value(), f"no conf/{key}/{ov.value()}.yaml; available: "
                                  f"{', '.join(options) or 'none'}")
            out.append(text)
            continue
        if ov.key_or_group.startswith(("+", "~")):
            raise ConfigError(ov.key_or_group, ov.value(), "adding or deleting keys is not allowed: "
                              "every key is fixed by the schema")
        out.append(f"++{text}" if _schema_node(key, ov.value()) else text)
    return out


def _one_line(err: BaseException) -> ConfigError:
    """Turn a Hydra/OmegaConf exception into ConfigError naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    cause = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and getattr(cause, "full_key", None):
        msg = str(getattr(cause, "msg", cause)).splitlines()[0]
        return ConfigError(cause.full_key, getattr(cause, "value", "?"), msg)
    first = next((line for line in str(err).splitlines() if line.strip()), repr(err))
    return ConfigError("config", "?", first)


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> ExperimentConfig:
    """Compose conf/<config_name>.yaml + overrides into a validated-by-type ExperimentConfig.

    Layout rules are checked separately by `validate.validate`, which needs the world size.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    overrides = check_overrides(list(overrides))
    ConfigStore.instance().store(name=SCHEMA_NAME, node=ExperimentConfig)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            dcfg = compose(config_name=config_name, overrides=overrides)
        return OmegaConf.to_object(dcfg)
    except ConfigError:
        raise
    except Exception as err:  # hydra and omegaconf raise many types; all are user errors here
        raise _one_line(err) from err


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, for manifests and `nemo-btx config`."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> ExperimentConfig:
    """Read back a config written by `to_yaml`, strictly (a run directory's resolved config)."""
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(text))
        return OmegaConf.to_object(merged)
    except Exception as err:
        raise _one_line(err) from err
