"""Helpers and fixtures for the data tests: small caps so the directory runs in well under a minute.

Not a conftest.py: the suite's modules import the top-level `conftest` by name, and a second
conftest module would shadow it.
"""

from pathlib import Path

import pytest

from nemo_btx.config import load_config

SMALL = ["data.max_chars_per_domain=200000", "model.vocab_size=512", "model.seq_length=64",
         "train.global_batch_size=8", "train.micro_batch_size=4", "train.train_iters=50"]
GSM8K_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test.jsonl"


def small_config(run_dir, *extra):
    """The tiny default with small data caps, in `run_dir`."""
    return load_config([f"run.dir={run_dir}", *SMALL, *extra])


_BUILT = {}


@pytest.fixture(scope="session")
def built_run(tmp_path_factory):
    """(cfg, run_dir, manifest) of a data stage run on the three builtin domains (small caps).

    Built once per session even though several modules import the fixture.
    """
    if not _BUILT:
        from nemo_btx.stages import data

        run_dir = tmp_path_factory.mktemp("built") / "run"
        cfg = small_config(run_dir)
        _BUILT["run"] = (cfg, run_dir, data.run(cfg))
    return _BUILT["run"]
