"""`nemo-btx mix` with Hugging Face Llama experts: a Mixtral directory written straight from
them (nemo_btx/hf/merge.py), with the megatron mix's merge rules."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env
from hf_models import LLAMA, assert_logits_close, bitwise_equal, hf_logits, make_llama, safetensors_of
from nemo_btx.config import load_config
from nemo_btx.errors import BtxError


def _mix(experts, out, *overrides):
    from nemo_btx.stages.mix import run

    run(load_config(["mix.experts=[" + ",".join(str(p) for p in experts) + "]", f"mix.out={out}",
                     "mix.include_seed=false", *overrides]))
    return out


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return [make_llama(root / f"e{i}", seed=i, max_shard_size="5GB" if i == 1 else "40KB")
            for i in range(3)]


@pytest.mark.parametrize("router", ["random", "zeros"])
def test_identical_experts_give_the_dense_logits(experts, tmp_path, router):
    copies = [shutil.copytree(experts[0], tmp_path / f"copy{i}") for i in range(3)]
    out = _mix(copies, tmp_path / "mixtral", f"mix.router_init={router}")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (3, 2)
    assert (out / "tokenizer.json").is_file()
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    assert_logits_close(hf_logits(out, tokens), hf_logits(experts[0], tokens))


def test_experts_copied_rest_averaged(experts, tmp_path):
    out = _mix(experts, tmp_path / "mixtral", "mix.average_weights=[1,1,2]")
    got = safetensors_of(out)
    src = [safetensors_of(e) for e in experts]
    w = [0.25, 0.25, 0.5]
    for layer in range(LLAMA["num_hidden_layers"]):
        for e in range(3):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                assert bitwise_equal(got[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{ours}.weight"],
                                     src[e][f"model.layers.{layer}.mlp.{theirs}.weight"])
        router = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert router.shape == (3, LLAMA["hidden_size"]) and 0.01 < router.std() < 0.03
    averaged = [n for n in src[0] if ".mlp." not in n]
    assert len(averaged) == 3 + 6 * LLAMA["num_hidden_layers"]
    for name in averaged:
        mean = src[0][name] * w[0] + src[1][name] * w[1] + src[2][name] * w[2]
        assert torch.allclose(got[name], mean, rtol=0, atol=1e-7), name
    assert sorted(got) == sorted(set(got))
    again = _mix(experts, tmp_path / "again", "mix.average_weights=[1,1,2]")  # reproducible router
    assert all(bitwise_equal(t, safetensors_of(again)[n]) for n, t in got.items())


def test_same_as_megatron_mix_then_export(experts, tmp_path):
    """HF experts -> import-hf -> megatron mix -> export-hf gives the same Mixtral, bit for bit."""
    from nemo_btx.stages.hf import export_hf, import_hf

    imported = []
    for i, e in enumerate(experts):
        imported.append(import_hf(load_config([f"hf.path={e}", f"hf.out={tmp_path / f'imp{i}'}"])))
    manifest = json.loads((imported[0] / "manifest.json").read_text())
    mixed = tmp_path / "mixed"
    cmd = [sys.executable, "-m", "nemo_btx.cli", "mix", f"run.dir={tmp_path / 'run'}",
           "mix.experts=[" + ",".join(str(p) for p in imported) + "]", "mix.include_seed=false",
           "mix.router_init=zeros", f"mix.out={mixed}", *manifest["overrides"]]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = export_hf(load_config([f"hf.path={mixed}", f"hf.out={tmp_path / 'exported'}"]))
    direct = _mix(experts, tmp_path / "direct", "mix.router_init=zeros")
    a, b = safetensors_of(direct), safetensors_of(exported)
    assert sorted(a) == sorted(b)
    assert [n for n in a if not bitwise_equal(a[n], b[n])] == []
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (direct, exported))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                "router_aux_loss_coef", "rms_norm_eps", "rope_theta", "vocab_size"):
        assert ca[key] == cb[key], key


def _bad_nan(experts, tmp_path):
    bad = shutil.copytree(experts[1], tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    files = sorted(bad.glob("*.safetensors"))
    t = load_file(str(files[0]))
    name = sorted(t)[0]
    t[name].view(-1)[5] = float("nan")
    save_file(t, str(files[0]), metadata={"format": "pt"})
    return [experts[0], bad], "holds 1 NaN/Inf"


@pytest.mark.parametrize("case", ["hidden", "duplicate", "exists", "nan", "truncated", "seed", "data"])
def test_bad_inputs_one_error_nothing_written(experts, tmp_path, case):
    out = tmp_path / "out"
    extra = []
    if case == "hidden":
        other = make_llama(tmp_path / "wide", seed=5, tokenizer=False, hidden_size=128)
        sources, want = [experts[0], other], "hidden_size=128"
    elif case == "duplicate":
        sources, want = [experts[0], experts[1], experts[0]], "used twice"
    elif case == "exists":
        out.mkdir()
        sources, want = experts[:2], "already exists"
    elif case == "nan":
        sources, want = _bad_nan(experts, tmp_path)
    elif case == "truncated":
        bad = shutil.copytree(experts[1], tmp_path / "trunc")
        f = bad / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
        sources, want = [experts[0], bad], "not a readable safetensors file"
    elif case == "seed":
        sources, want = experts[:2], "mix.include_seed=True"
        extra = ["mix.include_seed=true", f"mix.seed_checkpoint={tmp_path / 'nothing'}"]
    else:
        sources, want = experts[:2], "mix.router_init='data'"
        extra = ["mix.router_init=data"]
    with pytest.raises(BtxError) as err:
        _mix(sources, out, *extra)
    assert want in str(err.value), str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    assert (not out.exists()) or (case == "exists" and list(out.iterdir()) == [])


def test_cli_resolves_without_megatron_markers(experts, tmp_path):
    """`nemo-btx mix` end to end: HF experts select the Mixtral writer by themselves."""
    out = tmp_path / "mixtral"
    cmd = [sys.executable, "-m", "nemo_btx.cli", "mix", f"run.dir={tmp_path / 'run'}",
           "mix.experts=[" + ",".join(str(p) for p in experts) + "]", "mix.include_seed=false",
           f"mix.out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 3


def test_upcycle_refuses_mixtral_format(tmp_path):
    import subprocess
    import sys

    from conftest import REPO, clean_env

    proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", "upcycle", f"run.dir={tmp_path}",
                           "mix.format=mixtral"], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "mix.format" in proc.stderr and "export-hf" in proc.stderr
