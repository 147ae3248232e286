"""`nemo-btx mix` with Hugging Face Llama experts: a Mixtral directory written straight from
them (nemo_btx/hf/merge.py), with the megatron mix's merge rules."""

import dataclasses
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


def _bf16_copy(src, dst):
    """`src` with every tensor stored as bfloat16 (config.json says so too)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f),
                  metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _torch_mean(tensors, weights, dtype):
    """The megatron mixer's arithmetic: x0*w0 + x1*w1 + ... in float32, rounded to `dtype`."""
    acc = None
    for t, w in zip(tensors, weights):
        x = t.to(torch.float32)
        acc = torch.mul(x, w) if acc is None else acc.add_(x * w)
    return acc.to(dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16-asked"])
def test_experts_copied_rest_averaged(experts, tmp_path, dtype):
    """Bit for bit: FFNs copied, the rest the weighted float32 mean, weights 1/7, 2/7, 4/7
    (not exact in binary, so the order and rounding of every operation matter). In bfloat16
    the second expert stays float32: its FFN is rounded to bfloat16 on the way. float16-asked:
    float32 experts written as float16 (hf.dtype), everything rounded as torch rounds it."""
    extra = []
    if dtype == "bfloat16":
        experts = [_bf16_copy(experts[0], tmp_path / "b0"), experts[1], _bf16_copy(experts[2], tmp_path / "b2")]
    elif dtype == "float16-asked":
        dtype, extra = "float16", ["hf.dtype=float16"]
    out = _mix(experts, tmp_path / "mixtral", "mix.average_weights=[1,2,4]", *extra)
    got = safetensors_of(out)
    src = [safetensors_of(e) for e in experts]
    w = [1 / 7, 2 / 7, 4 / 7]
    stored = getattr(torch, dtype)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    for layer in range(LLAMA["num_hidden_layers"]):
        for e in range(3):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                assert bitwise_equal(got[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{ours}.weight"],
                                     src[e][f"model.layers.{layer}.mlp.{theirs}.weight"].to(stored))
        router = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert router.shape == (3, LLAMA["hidden_size"]) and 0.01 < router.float().std() < 0.03
    averaged = [n for n in src[0] if ".mlp." not in n]
    assert len(averaged) == 3 + 6 * LLAMA["num_hidden_layers"]
    for name in averaged:
        assert bitwise_equal(got[name], _torch_mean([s[name] for s in src], w, stored)), name
    assert sorted(got) == sorted(set(got))
    again = _mix(experts, tmp_path / "again", "mix.average_weights=[1,2,4]", *extra)  # reproducible router
    assert all(bitwise_equal(t, safetensors_of(again)[n]) for n, t in got.items())


def test_pieces_and_threads_do_not_change_the_result(experts, tmp_path, monkeypatch):
    """Tensors cut into many pieces (700 elements, so pieces end mid-row and mid-tensor), done
    by 3 threads in whatever order they finish, give the same bytes as one thread, one piece
    per tensor."""
    from nemo_btx.hf import merge

    whole = merge.merge_hf(experts, tmp_path / "one", threads=1, weights=[3, 1, 1])
    monkeypatch.setattr(merge, "_CHUNK", 700)
    cut = merge.merge_hf(experts, tmp_path / "many", threads=3, weights=[3, 1, 1])
    assert (whole["threads"], cut["threads"]) == (1, 3)
    a, b = safetensors_of(tmp_path / "one"), safetensors_of(tmp_path / "many")
    assert sorted(a) == sorted(b) and all(bitwise_equal(a[n], b[n]) for n in a)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "many").iterdir())
    for f in files:
        if f != "btx_mix.json":  # it records the thread count
            assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "many" / f).read_bytes(), f


def test_output_shards_follow_hf_max_shard_size(experts, tmp_path):
    """hf.max_shard_size cuts the Mixtral into several files listed in the index; the tensors
    are the ones a single file holds."""
    one = _mix(experts, tmp_path / "one")
    many = _mix(experts, tmp_path / "many", "hf.max_shard_size=50KB")
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in many.glob("model-*.safetensors"))
    a, b = safetensors_of(one), safetensors_of(many)
    assert sorted(a) == sorted(b) and all(bitwise_equal(a[n], b[n]) for n in a)
    for f in files:  # at most 50 KB of tensors per file, or one larger tensor alone
        names = [n for n, where in index["weight_map"].items() if where == f]
        assert len(names) == 1 or sum(b[n].numel() * b[n].element_size() for n in names) <= 50_000, f


def test_conversions_match_torch():
    """bfloat16/float16 -> float32 for every 16-bit pattern, and float32 -> bfloat16/float16
    for random values, exact halfway cases (both parities), subnormals and overflow: the same
    bits as torch's casts."""
    import numpy as np

    from nemo_btx.hf.merge import from_float32, nonfinite, to_float32

    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    for code, dt in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        theirs = every.view(dt).to(torch.float32)
        ours = to_float32(every.numpy().view(np.uint8), code, np.empty(2**16, np.float32))
        finite = torch.isfinite(theirs)
        assert torch.equal(torch.from_numpy(ours.copy()).view(torch.int32)[finite], theirs.view(torch.int32)[finite])
        scratch = np.empty(4 * 2**16, np.uint8)
        assert nonfinite(every.numpy().view(np.uint8), code, scratch)
        assert not nonfinite(every[finite].numpy().view(np.uint8), code, scratch)
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    ties = (bits & ~0xFFFF) | 0x8000  # exactly halfway between two bfloat16 numbers
    x = torch.cat([bits, ties]).view(torch.float32)
    x = torch.cat([x[torch.isfinite(x)], torch.randn(100_000, generator=g) * 1e-39,
                   torch.randn(100_000, generator=g) * 7e4])  # subnormal; beyond float16's range
    n = x.numel()
    for code, dt in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        ours = from_float32(x.numpy(), code, np.empty(4 * n, np.uint8), np.empty(n, np.uint32))
        theirs = x.to(dt).view(torch.int16).numpy()
        assert np.array_equal(ours.view(np.int16), theirs), code


def test_merge_does_not_import_torch(experts, tmp_path):
    """The speed of the Hugging Face merge rests on never importing torch (about 1 s)."""
    out = tmp_path / "mixtral"
    code = ("import sys\nfrom nemo_btx.cli import main\n"
            f"rc = main(['mix', 'run.dir={tmp_path / 'run'}', 'mix.include_seed=false', "
            f"'mix.out={out}', 'mix.experts=[{','.join(str(p) for p in experts)}]'])\n"
            "assert rc == 0, rc\nprint('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("router,weights", [("zeros", None), ("random", "[1,2,4]")])
@pytest.mark.slow
def test_same_as_megatron_mix_then_export(experts, tmp_path, router, weights):
    """HF experts -> import-hf -> megatron mix -> export-hf gives the same Mixtral, bit for bit
    (the random router included: both draw it from mixing/router_random.py)."""
    from nemo_btx.stages.hf import export_hf, import_hf

    imported = []
    for i, e in enumerate(experts):
        imported.append(import_hf(load_config([f"hf.path={e}", f"hf.out={tmp_path / f'imp{i}'}"])))
    manifest = json.loads((imported[0] / "manifest.json").read_text())
    mixed = tmp_path / "mixed"
    cmd = [sys.executable, "-m", "nemo_btx.cli", "mix", f"run.dir={tmp_path / 'run'}",
           "mix.experts=[" + ",".join(str(p) for p in imported) + "]", "mix.include_seed=false",
           f"mix.router_init={router}", f"mix.out={mixed}", *manifest["overrides"],
           *([f"mix.average_weights={weights}"] if weights else [])]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = export_hf(load_config([f"hf.path={mixed}", f"hf.out={tmp_path / 'exported'}"]))
    direct = _mix(experts, tmp_path / "direct", f"mix.router_init={router}",
                  *([f"mix.average_weights={weights}"] if weights else []))
    a, b = safetensors_of(direct), safetensors_of(exported)
    assert sorted(a) == sorted(b)
    assert [n for n in a if not bitwise_equal(a[n], b[n])] == []
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (direct, exported))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                "router_aux_loss_coef", "rms_norm_eps", "rope_theta", "vocab_size"):
        assert ca[key] == cb[key], key


def test_both_writers_apply_one_recipe(experts, tmp_path, monkeypatch):
    """The Mixtral writer and the megatron-core writer take their rules from the same recipe
    (nemo_btx/mixing/recipe.py): with the seed included and a zero weight, both build equal
    recipes from the config, record its expert table and weights, and write the same bytes
    (the megatron MoE exported): the zero-weight source is left out of the mean by both."""
    from nemo_btx.mixing import recipe as recipes
    from nemo_btx.stages.hf import export_hf, import_hf
    from nemo_btx.stages.mix import run

    built = []
    real = recipes.mix_recipe
    monkeypatch.setattr(recipes, "mix_recipe", lambda cfg: built.append(real(cfg)) or built[-1])
    settings = ["mix.include_seed=true", "mix.average_weights=[1,0,3]", "mix.router_init=random",
                "train.seed=11", f"run.dir={tmp_path / 'run'}"]

    def mix(paths, out, *extra):
        run(load_config([f"mix.experts=[{paths[0]},{paths[1]}]", f"mix.seed_checkpoint={paths[2]}",
                         f"mix.out={out}", *settings, *extra]))
        return built[-1]

    direct = tmp_path / "direct"
    hf_recipe = mix(experts, direct)
    imported = [import_hf(load_config([f"hf.path={e}", f"hf.out={tmp_path / f'imp{i}'}"]))
                for i, e in enumerate(experts)]
    overrides = json.loads((imported[0] / "manifest.json").read_text())["overrides"]
    mixed = tmp_path / "mixed"
    mc_recipe = mix(imported, mixed, *overrides)
    assert len(built) == 2

    def rules(r):
        return (dataclasses.replace(r, sources=(), out=None),
                [(s.name, s.role, s.domains) for s in r.sources])
    assert rules(hf_recipe) == rules(mc_recipe)
    assert hf_recipe.weights == (0.25, 0.0, 0.75) and hf_recipe.averaged == ((0, 0.25), (2, 0.75))
    assert [s.path for s in hf_recipe.sources] == [e.resolve() for e in experts]
    assert [s.path for s in mc_recipe.sources] == [p.resolve() for p in imported]

    ffn = LLAMA["intermediate_size"]
    summary = json.loads((direct / "btx_mix.json").read_text())
    manifest = json.loads((mixed / "manifest.json").read_text())
    assert summary["weights"] == manifest["average_weights"] == list(hf_recipe.weights)
    assert summary["experts"] == manifest["moe"]["experts"] == hf_recipe.describe_experts(ffn)
    assert summary["num_experts"] == manifest["moe"]["num_experts"] == 3
    assert summary["router_topk"] == manifest["moe"]["router_topk"] == hf_recipe.router_topk

    exported = export_hf(load_config([f"hf.path={mixed}", f"hf.out={tmp_path / 'exported'}"]))
    a, b = safetensors_of(direct), safetensors_of(exported)
    assert sorted(a) == sorted(b) and [n for n in a if not bitwise_equal(a[n], b[n])] == []
    src = [safetensors_of(e) for e in experts]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert bitwise_equal(a[name], _torch_mean([src[0][name], src[2][name]], [0.25, 0.75], torch.float32))


def _bad_value(experts, tmp_path, name, value):
    """experts[1] with one element of tensor `name` set to `value`."""
    bad = shutil.copytree(experts[1], tmp_path / "bad")
    from safetensors.torch import load_file, save_file

    for f in sorted(bad.glob("*.safetensors")):
        t = load_file(str(f))
        if name in t:
            t[name].view(-1)[-5] = value
            save_file(t, str(f), metadata={"format": "pt"})
    return [experts[0], bad], f"tensor {name!r} holds 1 NaN/Inf"


@pytest.mark.parametrize("case", ["hidden", "duplicate", "exists", "nan-expert", "inf-averaged",
                                  "truncated", "seed", "data", "threads"])
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
    elif case == "nan-expert":  # a copied FFN
        sources, want = _bad_value(experts, tmp_path, "model.layers.1.mlp.down_proj.weight", float("nan"))
    elif case == "inf-averaged":  # found in the mean, then traced to its source
        sources, want = _bad_value(experts, tmp_path, "model.layers.0.self_attn.k_proj.weight", float("-inf"))
    elif case == "threads":
        sources, want = experts[:2], "mix.threads=0"
        extra = ["mix.threads=0"]
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
