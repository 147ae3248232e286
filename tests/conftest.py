"""Shared fixtures: a torchrun launcher for multi-process CPU tests, one small whole
experiment (`make run`, the README's main command) that several slow tests inspect, and the
seed of the suite's random choices (kill points), printed so that a failure can be replayed."""

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Random kill points (the step or moment a run is killed) come from one seed per session:
# NEMO_BTX_TEST_SEED if set, else a fresh one. The session header and every failing test that
# drew from it print the seed; setting it again replays the same choices.
SEED_VAR = "NEMO_BTX_TEST_SEED"
TEST_SEED = int(os.environ.get(SEED_VAR) or random.SystemRandom().randrange(2**32))


def pytest_report_header(config):
    return f"random kill points: {SEED_VAR}={TEST_SEED} (set it to replay them)"


# `make test-fast` (-m "not slow") is meant to finish in 3 minutes on 2 idle CPU cores.
FAST_BUDGET_S = 180
_SESSION_START = time.monotonic()
_SEED_USED = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _SEED_USED:  # again at the end (-q shows no header)
        terminalreporter.write_line(f"random kill points drawn with {SEED_VAR}={TEST_SEED}")
    took = time.monotonic() - _SESSION_START
    if config.option.markexpr.strip() == "not slow" and took > FAST_BUDGET_S:
        terminalreporter.write_line(
            f"note: the fast tier took {took:.0f} s, over its {FAST_BUDGET_S} s budget (on a busy "
            "machine that may be the load): mark the slowest tests above `slow`", yellow=True)


@pytest.fixture
def test_rng(request):
    """A `random.Random` seeded from the session seed: draw every random choice from it."""
    request.node.btx_seed = TEST_SEED
    _SEED_USED.append(request.node.nodeid)
    print(f"{SEED_VAR}={TEST_SEED}")
    return random.Random(TEST_SEED)


def replay_hint(seed: int = TEST_SEED) -> str:
    """For assertion messages: how to run the test again with the same random choices."""
    return f"replay with {SEED_VAR}={seed}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = getattr(item, "btx_seed", None)
    if seed is not None and report.failed:
        report.sections.append(("random kill points", f"replay: {SEED_VAR}={seed} "
                                f"{sys.executable} -m pytest '{item.nodeid}'"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_system_package(what: str):
    """A system package a test needs is missing: skip, naming the Makefile target that installs
    it, or fail in CI (`.ci/run` sets NEMO_BTX_CI=1), where `make test` has just run that target
    as root, so a missing package is a broken setup that a skip would hide."""
    how = "`make system-packages` (part of `make test`) installs it with apt-get as root"
    if os.environ.get("NEMO_BTX_CI") == "1":
        pytest.fail(f"{what}; {how}, and in CI it must have", pytrace=False)
    pytest.skip(f"{what}; {how}")


def clean_env(**extra) -> dict:
    """The test process's environment without a launcher's rank variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def run_torchrun(script, args, nproc: int, timeout: float = 180, env=None):
    """`torchrun --nproc_per_node nproc script args` with a hard timeout.

    Collectives that go wrong can hang instead of failing, so every multi-process test runs
    under a timeout and reports the processes' output when it fails.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def torchrun():
    return run_torchrun


@pytest.fixture(autouse=True, scope="module")
def _fresh_megatron_state():
    """Each test module starts without megatron parallel state or a process group.

    In-process tests (model building, the lm-eval model) initialise megatron-core's global
    parallel state; a module that leaves it behind must not break the next one.
    """
    yield
    if "megatron.core.parallel_state" not in sys.modules:
        return  # nothing to reset, and importing megatron here would cost seconds per module
    import torch
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def paper_inputs(root: Path) -> list:
    """What `experiment=llama2_7b_h100` requires, as files a config check accepts: an imported
    seed's directory (its marker says Llama-2 7B) with its tokenizer, and a corpus per domain.
    Returns the overrides that point at them."""
    import dataclasses

    from nemo_btx.config import load_config
    from nemo_btx.run_dir import CHECKPOINT_MARKER

    seed = root / "llama2_7b"
    (seed / "tokenizer").mkdir(parents=True, exist_ok=True)
    model = load_config(["experiment=llama2_7b_h100"]).model
    (seed / CHECKPOINT_MARKER).write_text(json.dumps({"kind": "weights", "model": dataclasses.asdict(model)}))
    (seed / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    out = [f"seed.checkpoint={seed}", f"data.tokenizer.path={seed / 'tokenizer'}"]
    for i, name in enumerate(("code", "math", "wiki")):
        corpus = root / "corpora" / f"{name}.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps({"text": f"{name} document {k}"}) + "\n" for k in range(4)))
        out.append(f"data.domains.{i}.source={corpus}")
    return out


# A small but complete experiment: every stage, every model, every task (few documents).
SMALL_EXPERIMENT = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.vocab_size=512", "model.seq_length=64",
         "train.micro_batch_size=4", "train.global_batch_size=8", "train.lr=3e-3",
         "data.max_chars_per_domain=150000", "data.eval_iters=1",
         "seed.train_iters=12", "seed.eval_interval=6", "seed.save_interval=4",
         "expert.train_iters=6", "expert.save_interval=2", "expert.eval_interval=3",
         "finetune.train_iters=6", "finetune.save_interval=2", "finetune.eval_interval=3",
         "baselines.save_interval=2", "baselines.eval_interval=100",
         "eval.limit=1", "eval.max_gen_toks=8", "eval.batch_size=16",
         "run.layouts.mix=ep2", "run.layouts.finetune=ep2"]



#: The small experiment as the suite runs it: 6 of its 10 models evaluated (one expert, one BTM,
#: one upcycled baseline; the others take the same code paths), 4 evaluation processes less.
SMALL_RUN = [*SMALL_EXPERIMENT, "eval.models=[seed,expert-code,btm-top2,btx,upcycle-data,dense]"]


@pytest.fixture(scope="session")
def small_experiment(tmp_path_factory):
    """`make run` (the README's main command) on a small budget, once per session:
    (run dir, seconds it took, completed process)."""
    rd = tmp_path_factory.mktemp("experiment") / "tiny"
    start = time.monotonic()
    proc = subprocess.run(["make", "-C", str(REPO), "run", f"VENV={sys.prefix}",
                           f"ARGS=run.dir={rd} {' '.join(SMALL_RUN)}"],
                          capture_output=True, text=True, timeout=1500, env=clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return rd, time.monotonic() - start, proc
