"""Tests of nemo_btx.runtime.cpu: every CPU redirection is necessary AND correct.

For each redirection:
* necessity: in a subprocess started with ``NEMO_BTX_CPU_SKIP=<name>`` the megatron-core
  operation that needs it fails with the known error (and, once the redirection is applied in
  that same process, succeeds);
* correctness: with every redirection applied the operation gives the right result (equal to
  a single-process TP1/EP1/PP1 reference built from the same weights).

Single-process operations run in ``cpu_checks.py single`` (one import of megatron-core, one
forked child per job); 2- and 4-process ones under torchrun with gloo.  All results are
computed once per module (fixtures) and each test asserts on its part.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from nemo_btx.runtime import cpu

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHECKS = HERE / "cpu_checks.py"
ALL = list(cpu.REDIRECTIONS)
NOT_CUDA = "Torch not compiled with CUDA enabled"
MEGATRON = "megatron/core/"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU redirections only")


# ------------------------------------------------------------------------------------------
# Running the helper script
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(skip: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        cpu.SKIP_ENV_VAR)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if skip:
        env[cpu.SKIP_ENV_VAR] = skip
    return env


def _run(cmd, env, timeout):
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # collectives can hang instead of failing
        pytest.fail(f"{cmd} timed out after {timeout}s:\n{(exc.stderr or '')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{cmd} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(checks: list, tmp: Path, *, nproc: int = 2, skip: str | None = None,
             timeout: int = 90) -> dict:
    """Run cpu_checks.py under torchrun; returns {(check, rank): record} (+ '.after' checks)."""
    out = tmp / f"dist-{nproc}-{skip or 'all'}"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(CHECKS), "dist", ",".join(checks), str(out)]
    _run(cmd, _env(skip), timeout)
    results = {}
    for f in out.glob("*.json"):
        m = re.fullmatch(r"(.+)\.rank(\d+)\.json", f.name)
        results[(m[1], int(m[2]))] = json.loads(f.read_text())
    for check in checks:
        for rank in range(nproc):
            assert (check, rank) in results, f"no result for {check} on rank {rank}"
    return results


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu-single") / "single.json"
    _run([sys.executable, str(CHECKS), "single", str(out)], _env(), timeout=150)
    results = json.loads(out.read_text())
    for key, value in results.items():
        assert "fatal" not in value, f"{key}: {value['fatal']}"
    return results


DIST_CHECKS = ["ep2", "tp2", "distopt", "vpp", "uneven_collectives", "moe_forward_ep2",
               "moe_forward_etp2", "ckpt_fully_parallel"]


@pytest.fixture(scope="module")
def dist_all(tmp_path_factory):
    return torchrun(DIST_CHECKS, tmp_path_factory.mktemp("cpu-dist"), timeout=120)


@pytest.fixture(scope="module")
def dist_4(tmp_path_factory):
    return torchrun(["tp2ep2"], tmp_path_factory.mktemp("cpu-dist4"), nproc=4, timeout=120)


def _ok(rec, what=""):
    assert rec["ok"], f"{what} failed:\n{rec.get('traceback', rec)}"
    return rec["data"]


def _flat(losses):
    return [x for step in losses for x in step]


def _frames(rec):
    return [(f"{Path(f).parent.name}/{Path(f).name}", fn) for f, fn in rec["frames"]]


def _assert_fails(rec, error_type, text, frame=None):
    assert not rec["ok"], (
        f"expected {error_type} ({text!r}) but the operation succeeded: the redirection may "
        f"have become unnecessary in this megatron-core/torch version"
    )
    assert rec["error_type"] == error_type, rec["traceback"]
    assert text in rec["error"], rec["traceback"]
    if frame is not None:
        assert frame in _frames(rec), (frame, _frames(rec))


def _skip_job(single, name):
    job = single[f"skip:{name}"]
    assert job["applied"] == [n for n in ALL if n != name], "NEMO_BTX_CPU_SKIP was not honoured"
    assert job["late_applied"] == ALL
    return job


# ------------------------------------------------------------------------------------------
# API (in-process; nothing is applied to the pytest process)
# ------------------------------------------------------------------------------------------


def test_registry_lists_the_ten_redirections_with_reasons():
    # torch_adam_step_state is tested in tests/training/test_resume.py (DistOpt resume).
    assert ALL == [
        "current_device", "rng_state", "streams_events", "te_general_gemm",
        "alltoall_split_sizes", "cuda_factories", "torch_norm_sequence_parallel",
        "distributed_optimizer_param_type", "gloo_uneven_collectives", "torch_adam_step_state",
    ]
    for name, (why, fn) in cpu.REDIRECTIONS.items():
        assert callable(fn) and fn.__name__ == f"redirect_{name}"
        assert len(why) > 20 and len(fn.__doc__) > 200, name


def test_unknown_names_are_rejected_before_anything_is_applied(monkeypatch):
    before = cpu.applied_redirections()
    with pytest.raises(ValueError, match="unknown CPU redirection"):
        cpu.apply_cpu_redirections(skip=["current_devise"])
    monkeypatch.setenv(cpu.SKIP_ENV_VAR, "rng_state, nope")
    with pytest.raises(ValueError, match="nope"):
        cpu.apply_cpu_redirections()
    assert cpu.applied_redirections() == before


def test_nothing_is_applied_when_cuda_is_available(monkeypatch):
    before = cpu.applied_redirections()
    current_device = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.apply_cpu_redirections() == []
    assert cpu.applied_redirections() == before
    assert torch.cuda.current_device is current_device
    config = types.SimpleNamespace(batch_p2p_comm=True)
    assert cpu.force_batch_p2p_comm_off(config, user_requested=True) is False
    assert config.batch_p2p_comm is True


def test_force_batch_p2p_comm_off(caplog):
    config = types.SimpleNamespace(batch_p2p_comm=True)
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.force_batch_p2p_comm_off(config) is True
    assert config.batch_p2p_comm is False and not caplog.records
    config.batch_p2p_comm = True
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.force_batch_p2p_comm_off(config, user_requested=True) is True
    assert config.batch_p2p_comm is False
    assert any("batch_p2p_comm" in r.getMessage() for r in caplog.records)
    assert cpu.force_batch_p2p_comm_off(config, user_requested=True) is False


def _megatron_root() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("megatron.core").origin).parent  # no import needed


def test_every_hard_coded_cuda_factory_module_is_redirected_or_excluded():
    """A megatron-core upgrade that adds device="cuda" somewhere must be looked at."""
    root = _megatron_root()
    pattern = re.compile(r"""device\s*=\s*['"]cuda['"]""")
    found = set()
    for path in root.rglob("*.py"):
        if pattern.search(path.read_text(errors="ignore")):
            found.add("megatron.core." + ".".join(path.relative_to(root).with_suffix("").parts))
    excluded = tuple(cpu.CUDA_FACTORY_NOT_REDIRECTED)
    unhandled = {m for m in found
                 if m not in cpu.CUDA_FACTORY_MODULES
                 and not any(m == e or m.startswith(e + ".") for e in excluded)}
    assert not unhandled, f"hard-coded device='cuda' in modules neither redirected nor excluded: {unhandled}"
    stale = [e for e in excluded if not any(m == e or m.startswith(e + ".") for m in found)]
    assert not stale, f"exclusions without a hard-coded cuda device any more: {stale}"


def test_checkpoint_exchange_still_calls_tensor_cuda():
    """The Tensor.cuda scope in cuda_factories is needed only while megatron calls .cuda()."""
    source = (_megatron_root() / "dist_checkpointing" / "exchange_utils.py").read_text()
    for fn in cpu._CUDA_METHOD_FUNCTIONS:
        body = source.split(f"def {fn}(", 1)[1].split("\ndef ", 1)[0]
        assert ".cuda()" in body, f"{fn} no longer calls .cuda(): the scope may be unnecessary"


def test_tensor_method_scopes_are_local_and_reentrant():
    t = torch.ones(2)
    original_cuda, original_type = torch.Tensor.cuda, torch.Tensor.type
    with cpu._cuda_method_stays_on_cpu():
        with cpu._cuda_method_stays_on_cpu():
            assert t.cuda() is t
        assert t.cuda() is t
    with cpu.cpu_params_reported_as_cuda():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64
    assert torch.Tensor.cuda is original_cuda and torch.Tensor.type is original_type
    assert t.type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        t.cuda()


# ------------------------------------------------------------------------------------------
# Single-process operations: necessity and correctness
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_all_single_process_operations_succeed_with_every_redirection(single):
    job = single["all"]
    assert job["applied"] == ALL
    for name, rec in job["ops"].items():
        data = _ok(rec, name)
        for sub, subrec in data.get("subops", {}).items():
            _ok(subrec, f"{name}/{sub}")


@pytest.mark.slow
def test_idempotent(single):
    data = _ok(single["all"]["checks"]["idempotent"])
    assert data["lists"] == [ALL, ALL]
    assert data["same_objects"] and data["alltoall_wrapped_once"]


@pytest.mark.slow
def test_current_device(single):
    job = _skip_job(single, "current_device")
    _assert_fails(job["op"], "AssertionError", NOT_CUDA,
                  ("embeddings/rotary_pos_embedding.py", "get_emb"))
    assert ("cuda/__init__.py", "current_device") in _frames(job["op"])
    assert _ok(job["op_after"])["inv_freq_device"] == "cpu"
    assert _ok(single["all"]["ops"]["current_device"])["inv_freq_device"] == "cpu"
    assert _ok(single["all"]["checks"]["idempotent"])["current_device"] == "cpu"


@pytest.mark.slow
def test_rng_state(single):
    job = _skip_job(single, "rng_state")
    _assert_fails(job["op"], "AssertionError", NOT_CUDA, ("tensor_parallel/random.py", "add"))
    assert ("cuda/random.py", "get_rng_state") in _frames(job["op"])
    _ok(job["op_after"])
    data = _ok(single["all"]["checks"]["rng_semantics"])
    assert data["reproducible"], "re-seeding does not reproduce the forked draws"
    assert data["model_parallel_stream_seeded"], "fork() is not the seed+2718+tp_rank stream"
    assert data["expert_parallel_stream_seeded"], "expert fork is not seed+1024+100*ep+etp"
    assert data["default_stream_untouched_by_forks"], "forks disturb the default CPU stream"
    assert data["forks_differ_from_default"]
    assert data["warnings"] == [], "spurious 'CPU RNG state changed' warnings"


@pytest.mark.slow
def test_streams_events(single):
    job = _skip_job(single, "streams_events")
    _assert_fails(job["op"], "RuntimeError", "torch.cuda.Stream requires CUDA support",
                  ("moe/token_dispatcher.py", "__init__"))
    assert _ok(job["op_after"])["stream"] == "CpuStream"
    _ok(single["all"]["checks"]["streams_events"])
    # The dispatcher's stream/event/record_stream dance runs in the EP=2 forward/backward
    # (test_alltoall_split_sizes_ep2_equals_single_process) and the batched p2p path's
    # torch.cuda.synchronize() in test_interleaved_pp2_vp2_batch_p2p_comm_silently_wrong.


@pytest.mark.slow
def test_te_general_gemm(single):
    job = _skip_job(single, "te_general_gemm")
    _assert_fails(job["op"], "NameError", "name 'te_general_gemm' is not defined",
                  ("moe/moe_utils.py", "forward"))
    _ok(job["op_after"])
    data = _ok(single["all"]["checks"]["te_general_gemm"])
    assert data == {"value": True, "grad_x": True, "grad_w": True}


@pytest.mark.slow
def test_cuda_factories(single):
    job = _skip_job(single, "cuda_factories")
    _assert_fails(job["op"], "AssertionError", NOT_CUDA,
                  ("pipeline_parallel/schedules.py", "forward_backward_no_pipelining"))
    _ok(job["op_after"])
    data = _ok(single["all"]["checks"]["cuda_factories"])
    assert data["scheduled"] == data["direct"], "schedule losses differ from a direct forward"
    assert data["zeros_device"] == "cpu"
    assert data["global_torch_untouched"], "torch.zeros was patched globally"
    assert data["proxy_is_plain_module"]
    # Cost: a handful of factory calls per step, each a fraction of a microsecond extra.
    extra = data["proxied_factory_calls_per_step"] * max(0.0, data["factory_us_proxy"] - data["factory_us_real"]) * 1e-6
    assert data["proxied_factory_calls_per_step"] < 100
    assert extra < 0.01 * data["step_seconds"], data
    assert data["attr_ns_proxy"] < 2 * data["attr_ns_real"] + 50, data


@pytest.mark.slow
def test_torch_norm_sequence_parallel(single):
    job = _skip_job(single, "torch_norm_sequence_parallel")
    _assert_fails(job["op"], "AssertionError", "sequence parallel not supported by torch LayerNorm",
                  ("transformer/torch_norm.py", "__new__"))
    _ok(job["op_after"])
    data = _ok(single["all"]["ops"]["torch_norm_sequence_parallel"])
    assert data == {"type": "RMSNorm", "marked": [True], "config_sp_unchanged": True}


@pytest.mark.slow
def test_distributed_optimizer_param_type(single):
    job = _skip_job(single, "distributed_optimizer_param_type")
    sub = _ok(job["op"])["subops"]
    _assert_fails(sub["distopt"], "TypeError",
                  "Wrapped parameters must be one of torch.cuda.FloatTensor",
                  ("optimizer/distrib_optimizer.py", "_build_model_and_main_param_groups"))
    _assert_fails(sub["plain_clipped"], "AssertionError", "",
                  ("optimizer/clip_grads.py", "clip_grad_by_total_norm_fp32"))
    _assert_fails(sub["bf16"], "TypeError", "Received torch.BFloat16Tensor",
                  ("optimizer/optimizer.py", "__init__"))
    for name, rec in _ok(job["op_after"])["subops"].items():
        _ok(rec, name)
    data = _ok(single["all"]["checks"]["distributed_optimizer_single"])
    assert _flat(data["losses_distopt"]) == pytest.approx(_flat(data["losses_plain"]), abs=1e-7)
    assert data["max_param_diff"] < 1e-7


# ------------------------------------------------------------------------------------------
# Multi-process (torchrun, gloo)
# ------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.slow
def test_alltoall_split_sizes_necessary(tmp_path):
    res = torchrun(["moe_forward_ep2"], tmp_path, skip="alltoall_split_sizes")
    for rank in range(2):
        rec = res[("moe_forward_ep2", rank)]
        assert rec["applied"] == [n for n in ALL if n != "alltoall_split_sizes"]
        _assert_fails(rec, "TypeError", "all_to_all_single(): incompatible function arguments",
                      ("tensor_parallel/mappings.py", "forward"))
        _ok(res[("moe_forward_ep2.after", rank)], "after applying alltoall_split_sizes")


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.slow
def test_alltoall_split_sizes_ep2_equals_single_process(dist_all):
    for rank in range(2):
        _ok(dist_all[("moe_forward_ep2", rank)], f"moe_forward_ep2 rank {rank}")
        data = _ok(dist_all[("ep2", rank)], f"ep2 rank {rank}")
        assert abs(data["loss"] - data["ref_loss"]) < 1e-5, data
        assert data["worst_grad_rel_err"] < 1e-5, data


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.slow
def test_gloo_uneven_collectives_necessary(tmp_path):
    res = torchrun(["uneven_collectives", "moe_forward_etp2"], tmp_path,
                   skip="gloo_uneven_collectives")
    for rank in range(2):
        sub = _ok(res[("uneven_collectives", rank)])["subops"]
        _assert_fails(sub["gather"], "RuntimeError", "ProcessGroupGloo::allgather: invalid tensor size",
                      ("tensor_parallel/mappings.py", "_gather_along_first_dim"))
        # gloo does uneven reduce_scatter natively (so only the gather is redirected); if this
        # starts failing, the redirection must cover reduce_scatter again.
        assert _ok(sub["reduce_scatter"], "native uneven reduce_scatter")["values"]
        _assert_fails(res[("moe_forward_etp2", rank)], "RuntimeError",
                      "ProcessGroupGloo::allgather: invalid tensor size",
                      ("moe/token_dispatcher.py", "dispatch_postprocess"))
        _ok(res[("moe_forward_etp2.after", rank)], "after applying gloo_uneven_collectives")


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.slow
def test_gloo_uneven_collectives_values_and_grads(dist_all):
    for rank in range(2):
        sub = _ok(dist_all[("uneven_collectives", rank)])["subops"]
        assert _ok(sub["gather"]) == {"values": True, "grad": True}
        assert _ok(sub["reduce_scatter"]) == {"values": True, "shape": [[3, 4], [5, 4]][rank]}
        _ok(dist_all[("moe_forward_etp2", rank)])


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.slow
def test_gloo_uneven_collectives_tp2_ep2_etp2_equals_single_process(dist_4):
    """4 processes: the layout where the dispatcher's expert-TP gathers are uneven."""
    for rank in range(4):
        data = _ok(dist_4[("tp2ep2", rank)], f"tp2ep2 rank {rank}")
        assert data["dp_rank"] == data["expected_dp_rank"]
        assert abs(data["loss"] - data["ref_loss"]) < 1e-5, data
        assert data["worst_grad_rel_err"] < 1e-5, data


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.slow
def test_torch_norm_sequence_parallel_tp2_grads_equal_single_process(dist_all):
    for rank in range(2):
        data = _ok(dist_all[("tp2", rank)], f"tp2 rank {rank}")
        assert abs(data["loss"] - data["ref_loss"]) < 1e-5, data
        assert len(data["norm_errors"]) == 5
        assert max(data["norm_errors"].values()) < 1e-5, data["norm_errors"]
        assert data["worst_grad_rel_err"] < 1e-5, data
        # 5 norms + 2 routers carry the sequence_parallel marker
        assert data["n_norm_params_marked"] == 7


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.slow
def test_distributed_optimizer_dp2_equals_plain_optimizer(dist_all):
    for rank in range(2):
        data = _ok(dist_all[("distopt", rank)], f"distopt rank {rank}")
        assert _flat(data["losses_distopt"]) == pytest.approx(_flat(data["losses_plain"]), abs=1e-6)
        assert data["max_param_diff"] < 1e-6, data
        assert data["ranks_agree"], "distributed optimizer left ranks with different params"
        assert data["params_moved"] > 1e-4, "the optimizer did not update the parameters"


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.slow
def test_interleaved_pp2_vp2_batch_p2p_comm_silently_wrong(dist_all):
    """The SILENT bug force_batch_p2p_comm_off guards against (PP=2, VP=2, gloo)."""
    last = _ok(dist_all[("vpp", 1)], "vpp rank 1")  # the last stage holds the losses
    first = _ok(dist_all[("vpp", 0)], "vpp rank 0")
    for data in (first, last):
        assert data["batch_False"]["worst_grad_rel_err"] < 1e-5, (
            "batch_p2p_comm=False no longer matches the single-process gradients")
    bug = max(first["batch_True"]["worst_grad_rel_err"], last["batch_True"]["worst_grad_rel_err"])
    assert bug > 1e-2, (
        "interleaved PP=2/VP=2 with batch_p2p_comm=True now matches the single-process "
        "gradients: the bug no longer reproduces and force_batch_p2p_comm_off may be unnecessary")
    ref = last["ref_losses"]
    assert last["batch_False"]["losses"] == pytest.approx(ref, abs=1e-6)
    assert last["batch_True_forward_only"]["losses"] == pytest.approx(ref, abs=1e-6)


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.slow
def test_cuda_factories_fully_parallel_checkpoint_load(dist_all):
    """torch_dist save with the fully parallel wrapper, then loads (plain, broadcast exchange
    through the Tensor.cuda scope, gather_object) restore the exact weights."""
    for rank in range(2):
        data = _ok(dist_all[("ckpt_fully_parallel", rank)], f"ckpt rank {rank}")
        for algo, rec in data["subops"].items():
            assert _ok(rec, algo) == 0.0, algo
