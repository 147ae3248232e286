"""A small run directory for the evaluation tests, built once per session: real data and a
seed trained for 2 steps (through the CLI, so its manifest has the training loop's validation
loss), plus random-weight dense experts and a random 4-expert top-2 MoE.

Not a conftest.py: the suite imports the top-level `conftest` by name.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env

SMALL = ["data.max_chars_per_domain=200000", "model.vocab_size=512", "model.seq_length=64",
         "train.global_batch_size=8", "train.micro_batch_size=4", "data.eval_iters=1"]
SEED = ["seed.train_iters=2", "seed.eval_interval=2", "seed.save_interval=2"]
_BUILT = {}


def _run(args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory) -> Path:
    if "run" not in _BUILT and os.environ.get("BTX_EVAL_TEST_RUN"):  # reuse a built run while iterating
        _BUILT["run"] = Path(os.environ["BTX_EVAL_TEST_RUN"])
    if "run" not in _BUILT:
        run_dir = tmp_path_factory.mktemp("evalrun") / "run"
        _run(["-m", "nemo_btx.cli", "data", f"run.dir={run_dir}", *SMALL])
        _run(["-m", "nemo_btx.cli", "seed", f"run.dir={run_dir}", *SMALL, *SEED])
        _run([str(Path(__file__).with_name("make_checkpoints.py")), str(run_dir), *SMALL])
        _BUILT["run"] = run_dir
    return _BUILT["run"]
