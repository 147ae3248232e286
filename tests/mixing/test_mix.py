"""Exactness of the mix: expert weights, averages, routers, and the function of the MoE.

Everything runs in this process on tiny random Llama-style models (module-scoped runtime).
"""

import json

import pytest
import torch

from mixhelpers import SMALL, copy_checkpoint, experts_override, make_dense, run_mix, runtime  # noqa: F401
from nemo_btx.config import load_config
from nemo_btx.errors import ConfigError
from nemo_btx.training.checkpoint import read_tensors

FC1, FC2 = "decoder.layers.mlp.linear_fc1.weight", "decoder.layers.mlp.linear_fc2.weight"
EFC1, EFC2 = ("decoder.layers.mlp.experts.experts.linear_fc1.weight",
              "decoder.layers.mlp.experts.experts.linear_fc2.weight")
ROUTER = "decoder.layers.mlp.router.weight"
F = 128


@pytest.fixture(scope="module")
def distinct(runtime, tmp_path_factory):
    """Two experts and a seed, all different."""
    d = tmp_path_factory.mktemp("distinct")
    return [make_dense(d / name, seed) for name, seed in (("code", 1), ("math", 2), ("seed", 3))]


@pytest.fixture(scope="module")
def identical(runtime, tmp_path_factory):
    """Three copies of one dense model at different paths."""
    d = tmp_path_factory.mktemp("identical")
    first = make_dense(d / "a", 7)
    return [first, copy_checkpoint(first, d / "b"), copy_checkpoint(first, d / "c")]


def sources(paths, out, *extra):
    return [experts_override(paths[:-1]), f"mix.seed_checkpoint={paths[-1]}", f"mix.out={out}",
            "data.domains=[{name: code}, {name: math}]", *extra]


def tokens(cfg):
    g = torch.Generator().manual_seed(0)
    return torch.randint(cfg.model.vocab_size, (2, cfg.model.seq_length), generator=g)


@torch.no_grad()
def logits(cfg, ckpt, mutate=None, scale_fc2=None):
    from nemo_btx.model.build import build_model
    from nemo_btx.training.checkpoint import load_model_weights

    (model,) = build_model(cfg, wrap_ddp=False)
    load_model_weights([model], ckpt, cfg.model)
    model.eval()
    if scale_fc2 is not None:
        for layer in model.decoder.layers:
            layer.mlp.linear_fc2.weight.mul_(scale_fc2)
    if mutate is not None:
        mutate(model)
    t = tokens(cfg)
    pos = torch.arange(t.shape[1]).unsqueeze(0).expand_as(t)
    return model(t, pos, None).float()


def set_router(fn):
    def mutate(model):
        for i, layer in enumerate(model.decoder.layers):
            w = layer.mlp.router.weight
            w.copy_(fn(w, i))
    return mutate


def test_identical_experts_reproduce_the_dense_model(identical, tmp_path):
    """(a) N copies of one dense model -> an MoE with the dense logits, whatever the router."""
    out = tmp_path / "moe"
    plan, moe_cfg = run_mix(sources(identical, out))
    dense = logits(load_config(SMALL), identical[0])
    g = torch.Generator().manual_seed(5)
    routers = {
        "random (as mixed)": None,
        "zeros": set_router(lambda w, i: torch.zeros_like(w)),
        "perturbed": set_router(lambda w, i: w + torch.randn(w.shape, generator=g)),
        "large random": set_router(lambda w, i: torch.randn(w.shape, generator=g) * 10),
    }
    for name, mutate in routers.items():
        moe = logits(moe_cfg, out, mutate)
        assert torch.allclose(moe, dense, rtol=1e-5, atol=1e-5), \
            f"{name}: max diff {(moe - dense).abs().max():.3g}"
    # and the function is not trivially constant
    assert dense.std() > 0.1


def test_experts_copied_and_the_rest_averaged(distinct, tmp_path):
    """(b) expert i == source i's FFN bit for bit; every other tensor == the sources' mean."""
    out = tmp_path / "moe"
    plan, moe_cfg = run_mix(sources(distinct, out))
    moe = read_tensors(out)
    src = [read_tensors(p) for p in distinct]
    assert moe[EFC1].shape == (2, 3, 2 * F, 64) and moe[EFC2].shape == (2, 3, 64, F)
    for i, s in enumerate(src):
        assert torch.equal(moe[EFC1][:, i], s[FC1]), f"fc1 of expert {i}"
        assert torch.equal(moe[EFC2][:, i], s[FC2]), f"fc2 of expert {i}"
    averaged = set(src[0]) - {FC1, FC2}
    assert set(moe) == averaged | {EFC1, EFC2, ROUTER}
    assert any("layer_norm" in k for k in averaged) and "embedding.word_embeddings.weight" in averaged
    for key in averaged:
        mean = torch.stack([s[key] for s in src]).mean(0)
        assert torch.allclose(moe[key], mean, rtol=1e-6, atol=1e-7), key
        assert not torch.equal(moe[key], src[0][key]), key
    # random router: N(0, init_method_std), different per layer
    r = moe[ROUTER]
    assert r.shape == (2, 3, 64) and 0.01 < float(r.std()) < 0.03
    assert not torch.equal(r[0], r[1])
    # the manifest and the marker describe the MoE for the next stage
    manifest = json.loads((out / "manifest.json").read_text())
    marker = json.loads((out / "btx_checkpoint.json").read_text())
    assert manifest["complete"] and manifest["moe"]["num_experts"] == 3
    assert manifest["moe"]["router_topk"] == 2 and manifest["moe"]["aux_loss_coeff"] == 0.01
    assert [s["name"] for s in manifest["sources"]] == ["code", "math", "seed"]
    assert manifest["sources"][0]["marker"]["kind"] == "weights"
    assert marker["model"]["moe"]["num_experts"] == 3 and marker["stage"] == "mix"


def test_general_read_path_gives_the_same_bits(distinct, tmp_path, monkeypatch):
    """The pread fast path and DCP's torch.load path (used for anything the fast path does not
    recognise) produce identical checkpoints."""
    import nemo_btx.mixing.sources as sources_mod

    fast, slow = tmp_path / "fast", tmp_path / "slow"
    run_mix(sources(distinct, fast, "mix.split_experts=2"))
    monkeypatch.setattr(sources_mod, "_raw_offset", lambda *a: None)
    run_mix(sources(distinct, slow, "mix.split_experts=2"))
    a, b = read_tensors(fast), read_tensors(slow)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_weighted_average(distinct, tmp_path):
    out = tmp_path / "moe"
    run_mix(sources(distinct, out, "mix.average_weights=[1.0,0.0,3.0]", "mix.router_init=zeros"))
    moe, src = read_tensors(out), [read_tensors(p) for p in distinct]
    for key in set(src[0]) - {FC1, FC2}:
        want = 0.25 * src[0][key] + 0.75 * src[2][key]
        assert torch.allclose(moe[key], want, rtol=1e-6, atol=1e-7), key
    assert torch.equal(moe[EFC1][:, 1], src[1][FC1])  # weights never touch the experts
    assert torch.count_nonzero(moe[ROUTER]) == 0


def test_split_experts_concatenate_back_and_keep_the_dense_function(distinct, identical, tmp_path):
    """Split C=2: chunks concatenate back to each source FFN; with identical sources, a router
    that sends every token to all C chunks of one source computes the dense FFN scaled by 1/C
    (the paper's top-(k*C) softmax gives each of the C chunks weight 1/C)."""
    out = tmp_path / "split"
    plan, moe_cfg = run_mix(sources(distinct, out, "mix.split_experts=2"))
    assert moe_cfg.model.moe.num_experts == 6 and moe_cfg.model.moe.router_topk == 4
    assert moe_cfg.model.ffn_hidden_size == F // 2
    moe, src = read_tensors(out), [read_tensors(p) for p in distinct]
    for s, t in enumerate(src):
        gate = torch.cat([moe[EFC1][:, 2 * s + c, :F // 2] for c in range(2)], dim=1)
        up = torch.cat([moe[EFC1][:, 2 * s + c, F // 2:] for c in range(2)], dim=1)
        assert torch.equal(torch.cat([gate, up], dim=1), t[FC1])
        assert torch.equal(torch.cat([moe[EFC2][:, 2 * s + c] for c in range(2)], dim=2), t[FC2])

    out2 = tmp_path / "split-identical"
    _, cfg2 = run_mix(sources(identical[:2], out2, "mix.split_experts=2", "model.moe.router_topk=1"))
    assert cfg2.model.moe.num_experts == 4 and cfg2.model.moe.router_topk == 2
    g = torch.Generator().manual_seed(3)
    u = [torch.randn(64, generator=g) for _ in range(2)]
    one_source = set_router(lambda w, i: torch.stack([u[i], u[i], -u[i], -u[i]]))
    dense = logits(load_config(SMALL), identical[0], scale_fc2=0.5)
    moe = logits(cfg2, out2, one_source)
    assert torch.allclose(moe, dense, rtol=1e-5, atol=1e-5), (moe - dense).abs().max()


def test_blended_experts(distinct, identical, tmp_path):
    """Expert j = chunk (j+s) mod N of every source s (N=2 here); identical sources keep the
    dense function, since every blended expert is then a permutation of the dense FFN's units."""
    out = tmp_path / "blend"
    plan, moe_cfg = run_mix(sources(distinct[:2], out, "mix.blended=true"))
    assert moe_cfg.model.moe.num_experts == 2 and moe_cfg.model.ffn_hidden_size == F
    moe, src = read_tensors(out), [read_tensors(p) for p in distinct[:2]]
    h = F // 2
    for j in range(2):
        for s in range(2):
            c = (j + s) % 2
            for half in range(2):  # gate rows, then up rows
                got = moe[EFC1][:, j, half * F + s * h: half * F + (s + 1) * h]
                assert torch.equal(got, src[s][FC1][:, half * F + c * h: half * F + (c + 1) * h])
            assert torch.equal(moe[EFC2][:, j, :, s * h:(s + 1) * h], src[s][FC2][:, :, c * h:(c + 1) * h])
    with pytest.raises(ConfigError, match="must divide"):  # 3 sources do not divide F=128
        run_mix(sources(distinct, tmp_path / "blend3", "mix.blended=true"))

    out2 = tmp_path / "blend-identical"
    _, cfg2 = run_mix(sources(identical[:2], out2, "mix.blended=true"))
    dense = logits(load_config(SMALL), identical[0])
    zeros = set_router(lambda w, i: torch.zeros_like(w))
    for mutate in (None, zeros):
        assert torch.allclose(logits(cfg2, out2, mutate), dense, rtol=1e-5, atol=1e-5)


def test_upcycle_copies_the_seed_everywhere(identical, tmp_path):
    out = tmp_path / "up"
    plan, moe_cfg = run_mix([f"mix.seed_checkpoint={identical[0]}", f"mix.out={out}",
                             "data.domains=[{name: code}, {name: math}, {name: wiki}]"], kind="upcycle")
    assert moe_cfg.model.moe.num_experts == 4  # domains + 1
    moe, seed = read_tensors(out), read_tensors(identical[0])
    for e in range(4):
        assert torch.equal(moe[EFC1][:, e], seed[FC1]) and torch.equal(moe[EFC2][:, e], seed[FC2])
    for key in set(seed) - {FC1, FC2}:
        assert torch.equal(moe[key], seed[key]), key  # one source with weight 1: exact
    dense = logits(load_config(SMALL), identical[0])
    assert torch.allclose(logits(moe_cfg, out), dense, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["stage"] == "upcycle"


def test_router_init_data_is_each_sources_mean_hidden_state(distinct, tmp_path):
    """Router row e of layer l = unit mean of layer l's pre-MLP-norm output of source e's own
    model on its own batches (computed here independently with a plain forward)."""
    from nemo_btx.model.build import build_model
    from nemo_btx.training.checkpoint import load_model_weights

    cfg = load_config(SMALL)
    batches = {}
    for i, name in enumerate(["code", "math", "seed"]):
        g = torch.Generator().manual_seed(100 + i)
        batches[name] = [torch.randint(256, (4, 33), generator=g) for _ in range(2)]
    out = tmp_path / "moe"
    run_mix(sources(distinct, out, "mix.router_init=data", "mix.split_experts=2"),
            batches_for=lambda src: batches[src.name])
    router = read_tensors(out)[ROUTER]
    assert router.shape == (2, 6, 64)
    for s, (name, path) in enumerate(zip(["code", "math", "seed"], distinct)):
        (model,) = build_model(cfg, wrap_ddp=False)
        load_model_weights([model], path, cfg.model)
        model.eval()
        seen = {0: [], 1: []}
        hooks = [layer.pre_mlp_layernorm.register_forward_hook(
            lambda m, i, o, l=l: seen[l].append(o.reshape(-1, 64))) for l, layer in enumerate(model.decoder.layers)]
        with torch.no_grad():
            for b in batches[name]:
                t = b[:, :-1]
                model(t, torch.arange(32).expand_as(t), None)
        for h in hooks:
            h.remove()
        for layer in range(2):
            mean = torch.cat(seen[layer]).mean(0)
            want = mean / mean.norm()
            for c in range(2):  # both chunks of a split source share its row
                assert torch.allclose(router[layer, 2 * s + c], want, atol=1e-5), (name, layer, c)


def test_router_init_data_refused_without_domains(distinct, tmp_path):
    with pytest.raises(ConfigError, match="router_init"):
        run_mix(sources(distinct[:2], tmp_path / "x", "mix.router_init=data", "mix.blended=true"))
    with pytest.raises(ConfigError, match="router_init"):
        run_mix([f"mix.seed_checkpoint={distinct[2]}", f"mix.out={tmp_path / 'y'}",
                 "mix.router_init=data"], kind="upcycle")


def test_the_megatron_writer_applies_the_recipe(distinct, tmp_path):
    """Split experts, weights with a zero, the seed included: the plan's recipe is the config's
    recipe (nemo_btx/mixing/recipe.py, shared with the Hugging Face merge), and the MoE is
    exactly what it says: expert e = its layout's source units, every other tensor the
    recipe's terms summed in its order (bit for bit), the recorded table and weights its own."""
    from nemo_btx.mixing import recipe as recipes

    out = tmp_path / "moe"
    args = sources(distinct, out, "mix.split_experts=2", "mix.average_weights=[1,0,3]")
    plan, moe_cfg = run_mix(args)
    recipe = recipes.mix_recipe(load_config(SMALL + args))
    assert plan.recipe == recipe and plan.layout == recipe.layout(F)
    assert [s.name for s in plan.sources] == [s.name for s in recipe.sources] == ["code", "math", "seed"]
    assert moe_cfg.model.moe.num_experts == recipe.num_experts == 6
    assert moe_cfg.model.moe.router_topk == recipe.router_topk == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["average_weights"] == list(recipe.weights) == [0.25, 0.0, 0.75]
    assert manifest["moe"]["experts"] == recipe.describe_experts(F)
    moe, src = read_tensors(out), [read_tensors(p) for p in distinct]
    for e, segments in enumerate(recipe.layout(F)):
        gate = torch.cat([src[s.source][FC1][:, s.start:s.start + s.length] for s in segments], dim=1)
        up = torch.cat([src[s.source][FC1][:, F + s.start:F + s.start + s.length] for s in segments], dim=1)
        down = torch.cat([src[s.source][FC2][:, :, s.start:s.start + s.length] for s in segments], dim=2)
        assert torch.equal(moe[EFC1][:, e], torch.cat([gate, up], dim=1)), e
        assert torch.equal(moe[EFC2][:, e], down), e
    for key in set(src[0]) - {FC1, FC2}:
        acc = None
        for s, w in recipe.averaged:  # (0, 0.25), (2, 0.75): the zero-weight source is skipped
            x = src[s][key].float()
            acc = torch.mul(x, w) if acc is None else acc.add_(x * w)
        assert torch.equal(moe[key], acc.to(moe[key].dtype)), key
