"""Bad inputs fail with one clear error naming the path and the problem, and write nothing;
a mix killed at any point leaves nothing that looks complete, and a re-run succeeds."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mixhelpers import REPO, clean_env
from mixhelpers import SMALL, copy_checkpoint, experts_override, make_dense, run_mix, runtime  # noqa: F401
from nemo_btx.errors import BtxError, CheckpointError, ConfigError

WORKER = REPO / "tests" / "mixing" / "mix_worker.py"


@pytest.fixture(scope="module")
def good(runtime, tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return [make_dense(d / "code", 1), make_dense(d / "math", 2), make_dense(d / "seed", 3)]


def mix_args(paths, out):
    return [experts_override(paths[:-1]), f"mix.seed_checkpoint={paths[-1]}", f"mix.out={out}",
            "data.domains=[{name: code}, {name: math}]"]


def assert_nothing_written(out):
    assert not out.exists(), f"{out} was created"
    assert not (out.parent / f".{out.name}.tmp").exists(), "a staging directory was left"


@pytest.mark.parametrize("override,field", [
    ("model.hidden_size=32", "hidden_size"),
    ("model.vocab_size=300", "vocab_size"),
    ("model.num_layers=1", "num_layers"),
    ("model.num_attention_heads=2", "num_attention_heads"),
    ("model.ffn_hidden_size=96", "ffn_hidden_size"),
])
def test_mismatched_expert_is_named(good, tmp_path, override, field):
    odd = make_dense(tmp_path / "odd", 9, [override])
    out = tmp_path / "moe"
    with pytest.raises(CheckpointError) as err:
        run_mix(mix_args([good[0], odd, good[2]], out))
    assert str(odd) in str(err.value) and f"model.{field}" in str(err.value)
    assert_nothing_written(out)


def test_a_lying_marker_is_caught_by_the_tensor_index(good, tmp_path):
    odd = make_dense(tmp_path / "odd", 9, ["model.hidden_size=32"])
    marker = json.loads((odd / "btx_checkpoint.json").read_text())
    marker["model"]["hidden_size"] = 64
    (odd / "btx_checkpoint.json").write_text(json.dumps(marker))
    out = tmp_path / "moe"
    with pytest.raises(CheckpointError, match="has shape") as err:
        run_mix(mix_args([good[0], odd, good[2]], out))
    assert str(odd) in str(err.value)
    assert_nothing_written(out)


def test_missing_and_truncated_shards(good, tmp_path):
    missing = copy_checkpoint(good[1], tmp_path / "missing")
    victim = sorted(missing.glob("*.distcp"))[-1]
    victim.unlink()
    out = tmp_path / "moe"
    with pytest.raises(CheckpointError, match="missing shard file") as err:
        run_mix(mix_args([good[0], missing, good[2]], out))
    assert str(victim) in str(err.value)

    truncated = copy_checkpoint(good[1], tmp_path / "truncated")
    victim = sorted(truncated.glob("*.distcp"))[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated shard file") as err:
        run_mix(mix_args([good[0], truncated, good[2]], out))
    assert str(victim) in str(err.value)

    unmarked = copy_checkpoint(good[1], tmp_path / "unmarked")
    (unmarked / "btx_checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        run_mix(mix_args([good[0], unmarked, good[2]], out))
    assert_nothing_written(out)


def test_nan_and_inf_weights_are_named(good, tmp_path):
    poisoned = make_dense(tmp_path / "nan", 4, poison="decoder.layers.0.self_attention.linear_proj.weight")
    out = tmp_path / "moe"
    with pytest.raises(CheckpointError, match="NaN/Inf") as err:
        run_mix(mix_args([good[0], poisoned, good[2]], out))
    assert str(poisoned) in str(err.value) and "linear_proj.weight" in str(err.value)
    assert_nothing_written(out)
    # in an expert FFN (read straight into the MoE tensor) as well
    poisoned = make_dense(tmp_path / "inf-ffn", 4, poison="decoder.layers.1.mlp.linear_fc2.weight",
                          value=float("inf"))
    with pytest.raises(CheckpointError, match="linear_fc2.*NaN/Inf"):
        run_mix(mix_args([good[0], poisoned, good[2]], out))
    assert_nothing_written(out)


def test_the_same_expert_twice(good, tmp_path):
    out = tmp_path / "moe"
    with pytest.raises(ConfigError, match="used twice"):
        run_mix(mix_args([good[0], good[0], good[2]], out))
    with pytest.raises(ConfigError, match="used twice"):  # the seed listed as an expert too
        run_mix(mix_args([good[0], good[2], good[2]], out))
    assert_nothing_written(out)


def test_existing_output_is_refused_and_a_complete_one_skipped(good, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        run_mix(mix_args(good, out))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    from nemo_btx.config import load_config
    from nemo_btx.mixing.job import prepare
    from nemo_btx.mixing.plan import plan_mix

    done = tmp_path / "done"
    run_mix(mix_args(good, done))
    cfg = load_config(SMALL + mix_args(good, done))
    assert prepare(cfg, plan_mix(cfg)) is None  # complete: skipped, nothing checked or written


def test_bad_mix_settings(good, tmp_path):
    out = tmp_path / "moe"
    cases = [
        (["mix.average_weights=[1.0,2.0]"], "one weight per source"),
        (["mix.average_weights=[1.0,-1.0,1.0]"], ">= 0"),
        (["mix.split_experts=3"], "must divide"),
        (["mix.split_experts=2", "mix.blended=true"], "separate"),
        (["model.moe.num_experts=4"], "mix builds 3 experts"),
        (["model.moe.router_topk=4"], "between 1 and"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_mix(mix_args(good, out) + extra)
    moe_source = tmp_path / "moe-source"
    run_mix(mix_args(good, moe_source))
    with pytest.raises(CheckpointError, match="an MoE checkpoint"):
        run_mix(mix_args([good[0], moe_source, good[2]], out))
    assert_nothing_written(out)


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=clean_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_kill_during_write_leaves_nothing_complete_and_rerun_succeeds(good, tmp_path):
    out = tmp_path / "moe"
    args = SMALL + mix_args(good, out)
    # 1. killed after every byte, marker and manifest are written but before the rename
    proc = _cli([str(WORKER), "mix-hang", *args])
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "READY-TO-RENAME" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "READY-TO-RENAME" in line, f"worker ended early ({proc.poll()})"
    staging = out.parent / f".{out.name}.tmp"
    assert (staging / "manifest.json").is_file()  # it really was at the last step
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists(), "a killed mix left an output"

    # 2. a re-run cleans up and completes
    done = subprocess.run([sys.executable, "-m", "nemo_btx.cli", "mix", *args], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "manifest.json").is_file() and (out / "btx_checkpoint.json").is_file()
    assert not staging.exists()
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_cli_reports_bad_input_in_one_line(good, tmp_path):
    out = tmp_path / "moe"
    proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", "mix", *SMALL,
                           *mix_args([good[0], good[0], good[2]], out)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "used twice" in proc.stderr and "Traceback" not in proc.stderr
    assert_nothing_written(out)


def test_errors_are_btx_errors():
    assert issubclass(CheckpointError, BtxError) and issubclass(ConfigError, BtxError)
