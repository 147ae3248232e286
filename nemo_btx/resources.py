"""Where the project's data directories are: the Hydra presets (`conf/`) and the lm-eval tasks
(`eval/`).

In the repository they stay at the top level, where users edit them. A built wheel ships them
inside the package as `nemo_btx/_conf` and `nemo_btx/_eval` (setup.py maps the top-level
directories to those two data-only packages), so a non-editable install (`pip install .`, a
wheel on a cluster) finds them without the source tree. An editable install made with the
mapping (`pip install -e .`) resolves the same two names to the repository's `conf/` and
`eval/`, and a checkout that is only on `sys.path` (or an editable install made before the
mapping existed) falls back to the directories beside the `nemo_btx/` it was imported from.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: repository directory -> the package it is shipped as in a wheel.
PACKAGED = {"conf": "nemo_btx._conf", "eval": "nemo_btx._eval"}


def data_dir(name: str) -> Path:
    """The directory `name` ("conf" or "eval") of the nemo_btx that is imported."""
    package = PACKAGED[name]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if Path(location).is_dir():
                return Path(location)
    return Path(__file__).resolve().parents[1] / name

