"""The start-up check of the installed megatron-core against the release runtime/cpu.py is
written for: one clear error on another version, a loud warning with the override, on CPU and on
GPU nodes (init_runtime checks before anything else). The version lookup is monkeypatched."""

import logging
import re
import tomllib

import pytest
import torch

from conftest import REPO
from nemo_btx.config import load_config
from nemo_btx.errors import BtxError
from nemo_btx.runtime import cpu, distributed

ENV = cpu.ALLOW_VERSION_ENV_VAR


@pytest.fixture
def other_version(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(cpu, "installed_megatron_version", lambda: "0.17.0")
    monkeypatch.setattr(cpu, "_warned_versions", set())


def test_the_pinned_version_is_installed_and_declared():
    assert cpu.installed_megatron_version() == cpu.MEGATRON_CORE_VERSION == "0.16.1"
    assert cpu.check_megatron_version() == "0.16.1"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"megatron-core=={cpu.MEGATRON_CORE_VERSION}" in deps


def test_another_version_is_one_clear_error(other_version):
    with pytest.raises(BtxError) as err:
        cpu.check_megatron_version()
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(r"megatron-core 0\.17\.0 is installed.*megatron-core 0\.16\.1", msg)
    assert f"install megatron-core==0.16.1, or set {ENV}=1 (or =0.17.0) to run anyway" in msg


def test_a_local_build_label_is_the_same_release(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(cpu, "installed_megatron_version", lambda: "0.16.1+nv25.01")
    assert cpu.check_megatron_version() == "0.16.1+nv25.01"
    monkeypatch.setattr(cpu, "installed_megatron_version", lambda: "0.16.1rc0")
    with pytest.raises(BtxError):
        cpu.check_megatron_version()


@pytest.mark.parametrize("allow", ["1", "0.17.0"])
def test_the_override_turns_it_into_a_warning(other_version, monkeypatch, caplog, allow):
    monkeypatch.setenv(ENV, allow)
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.check_megatron_version() == "0.17.0"
        assert cpu.check_megatron_version() == "0.17.0"  # warned once per process
    (rec,) = [r for r in caplog.records if r.name == cpu.__name__]
    assert rec.levelno == logging.WARNING
    assert "megatron-core 0.17.0 is installed" in rec.getMessage() and "UNTESTED" in rec.getMessage()


@pytest.mark.parametrize("allow", ["0", "0.17.1", "yes"])
def test_an_override_for_another_version_does_not_count(other_version, monkeypatch, allow):
    monkeypatch.setenv(ENV, allow)
    with pytest.raises(BtxError):
        cpu.check_megatron_version()


def test_cpu_redirections_refuse_another_version(other_version, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BtxError, match="0.17.0 is installed"):
        cpu.apply_cpu_redirections()


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_init_runtime_checks_first_on_cpu_and_gpu(other_version, monkeypatch, gpu):
    """On a GPU node no redirection is applied, but the check still runs, before megatron-core
    is imported or a device or process group is touched."""
    touched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: touched.append("set_device"))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: touched.append("init_pg"))
    monkeypatch.setattr(cpu, "apply_cpu_redirections", lambda *a, **k: touched.append("redirections") or [])
    cfg = load_config([])
    with pytest.raises(BtxError, match="0.17.0 is installed"):
        distributed.init_runtime(cfg)
    assert touched == []
