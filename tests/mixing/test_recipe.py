"""The merge recipe's pure functions (nemo_btx/mixing/recipe.py, experts.py): no torch needed.

What the two writers do with a recipe is tested where they run: tests/mixing/test_mix.py
(megatron-core) and tests/hf/test_hf_merge.py (Mixtral; both writers on one recipe)."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, clean_env
from nemo_btx.config import load_config
from nemo_btx.errors import CheckpointError, ConfigError
from nemo_btx.mixing import recipe as recipes
from nemo_btx.mixing.experts import Chunk, Segment, pieces
from nemo_btx.mixing.router_random import random_router
from nemo_btx.run_dir import RunDir

DOMAINS = "data.domains=[{name: code}, {name: math}]"


def cfg_of(tmp_path, *overrides):
    return load_config([f"run.dir={tmp_path}", DOMAINS, *overrides])


def test_no_torch():
    """The recipe and the Hugging Face merge that uses it load without torch."""
    code = ("import sys\nfrom nemo_btx.config import load_config\n"
            "from nemo_btx.mixing import recipe\nimport nemo_btx.hf.merge\n"
            "r = recipe.mix_recipe(load_config(['mix.split_experts=2']))\n"
            "r.layout(352); r.router_weight(0, 8, 0.02)\nprint('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"


def test_sources_and_paths_come_from_the_run_dir(tmp_path):
    run = RunDir(tmp_path)
    r = recipes.mix_recipe(cfg_of(tmp_path))
    assert [(s.name, s.role, s.domains) for s in r.sources] == [
        ("code", "expert", ("code",)), ("math", "expert", ("math",)),
        ("seed", "seed", ("code", "math"))]
    assert [s.path for s in r.sources] == [run.expert("code") / "weights",
                                           run.expert("math") / "weights", run.seed / "weights"]
    assert r.out == run.mixed and r.kind == "mix"
    up = recipes.upcycle_recipe(cfg_of(tmp_path))
    assert up.out == run.upcycled == tmp_path / "baselines" / "upcycled"
    assert [s.path for s in up.sources] == [run.seed / "weights"] and up.weights == (1.0,)
    assert up.experts == ((Chunk(0),),) * 3 and up.kind == "upcycle"  # domains + 1

    # given one per domain: named after them; otherwise numbered (no domain); no seed
    given = recipes.mix_recipe(cfg_of(tmp_path, f"mix.experts=[{tmp_path / 'a'},{tmp_path / 'b'}]",
                                      "mix.include_seed=false", f"mix.out={tmp_path / 'o'}"))
    assert [(s.name, s.domains) for s in given.sources] == [("code", ("code",)), ("math", ("math",))]
    assert given.out == tmp_path / "o"
    three = recipes.mix_recipe(cfg_of(tmp_path, "mix.experts=[a,b,c]", "mix.include_seed=false"))
    assert [(s.name, s.domains) for s in three.sources] == [("expert0", ()), ("expert1", ()), ("expert2", ())]
    assert three.sources[0].path == Path("a").resolve()


def test_expert_tables_and_their_layout(tmp_path):
    btx = recipes.mix_recipe(cfg_of(tmp_path))
    assert btx.experts == ((Chunk(0),), (Chunk(1),), (Chunk(2),))
    assert btx.whole_ffn_sources() == (0, 1, 2) and btx.num_experts == 3
    assert btx.layout(12) == [[Segment(s, 0, 12)] for s in range(3)]

    split = recipes.mix_recipe(cfg_of(tmp_path, "mix.split_experts=2"))
    assert split.experts == tuple((Chunk(s, c, 2),) for s in range(3) for c in range(2))
    assert split.layout(12)[3] == [Segment(1, 6, 6)] and split.expert_ffn_size(12) == 6
    assert split.expert_sources == (0, 0, 1, 1, 2, 2) and split.whole_ffn_sources() is None
    with pytest.raises(ConfigError, match=r"mix.split_experts=2: must divide model.ffn_hidden_size=9"):
        split.layout(9)

    blend = recipes.mix_recipe(cfg_of(tmp_path, "mix.blended=true"))
    # expert j = chunk (j + s) mod N of every source s: a Latin square
    assert [[(c.source, c.index) for c in e] for e in blend.experts] == [
        [(0, 0), (1, 1), (2, 2)], [(0, 1), (1, 2), (2, 0)], [(0, 2), (1, 0), (2, 1)]]
    assert blend.layout(12)[1] == [Segment(0, 4, 4), Segment(1, 8, 4), Segment(2, 0, 4)]
    assert blend.expert_ffn_size(12) == 12 and blend.whole_ffn_sources() is None
    with pytest.raises(ConfigError, match=r"the number of sources \(3\) must divide"):
        blend.layout(128)
    assert blend.describe_experts(12)[0] == [{"source": "code", "start": 0, "length": 4},
                                             {"source": "math", "start": 4, "length": 4},
                                             {"source": "seed", "start": 8, "length": 4}]

    with pytest.raises(ConfigError, match="separate"):
        recipes.mix_recipe(cfg_of(tmp_path, "mix.split_experts=2", "mix.blended=true"))
    with pytest.raises(ConfigError, match="at least two sources"):
        recipes.mix_recipe(cfg_of(tmp_path, "mix.blended=true", "mix.experts=[a]", "mix.include_seed=false"))
    with pytest.raises(ConfigError, match="mix.split_experts=0"):
        recipes.mix_recipe(cfg_of(tmp_path, "mix.split_experts=0"))

    # the expert layout maps an expert's unit range back onto its sources
    assert list(pieces(blend.layout(12)[1], 2, 5)) == [(0, 6, 2, 2), (1, 8, 4, 3)]


def test_weights(tmp_path):
    assert recipes.normalised_weights(None, 4) == (0.25,) * 4
    w = recipes.normalised_weights([1, 0, 3], 3)
    assert w == (0.25, 0.0, 0.75) and math.fsum(w) == 1.0
    r = recipes.mix_recipe(cfg_of(tmp_path, "mix.average_weights=[1,0,3]"))
    assert r.weights == (0.25, 0.0, 0.75)
    assert r.averaged == ((0, 0.25), (2, 0.75))  # weight 0: never read, never summed
    for given, message in (([1.0, 2.0], "one weight per source"), ([1.0, -1.0, 1.0], ">= 0"),
                           ([0, 0, 0], "not all zero"), ([1.0, float("nan"), 1.0], "finite"),
                           ([1.0, float("inf"), 1.0], "finite")):
        with pytest.raises(ConfigError, match=message) as err:
            recipes.normalised_weights(given, 3)
        assert err.value.key == "mix.average_weights" and len(str(err.value).splitlines()) == 1


def test_topk_and_num_experts(tmp_path):
    assert recipes.mix_recipe(cfg_of(tmp_path)).router_topk == 2
    assert recipes.mix_recipe(cfg_of(tmp_path, "mix.split_experts=2")).router_topk == 4
    with pytest.raises(ConfigError, match=r"top-k x split_experts = 8 must be between 1 and the 6"):
        recipes.mix_recipe(cfg_of(tmp_path, "mix.split_experts=2", "model.moe.router_topk=4"))
    with pytest.raises(ConfigError, match=r"model.moe.router_topk=4: must be between 1 and the 3"):
        recipes.mix_recipe(cfg_of(tmp_path, "model.moe.router_topk=4"))
    with pytest.raises(ConfigError, match="mix builds 3 experts from 3 sources; leave it null"):
        recipes.mix_recipe(cfg_of(tmp_path, "model.moe.num_experts=4"))
    with pytest.raises(ConfigError, match="mix builds 6 experts from 3 sources x 2 chunks"):
        recipes.mix_recipe(cfg_of(tmp_path, "model.moe.num_experts=3", "mix.split_experts=2"))
    assert recipes.mix_recipe(cfg_of(tmp_path, "model.moe.num_experts=3")).num_experts == 3
    up = recipes.upcycle_recipe(cfg_of(tmp_path, "model.moe.num_experts=8"))
    assert up.num_experts == 8 and up.router_topk == 2
    with pytest.raises(ConfigError, match="between 1 and the 3 experts"):
        recipes.upcycle_recipe(cfg_of(tmp_path, "model.moe.router_topk=4"))


def test_moe_model(tmp_path):
    cfg = cfg_of(tmp_path, "mix.split_experts=2", "model.ffn_hidden_size=12")
    moe = recipes.mix_recipe(cfg).moe_model(cfg.model)
    assert (moe.ffn_hidden_size, moe.moe.num_experts, moe.moe.router_topk) == (6, 6, 4)
    assert moe.moe.aux_loss_coeff == cfg.model.moe.aux_loss_coeff and moe.hidden_size == cfg.model.hidden_size


def test_router_rules(tmp_path):
    r = recipes.mix_recipe(cfg_of(tmp_path, "train.seed=7"))
    assert np.array_equal(r.router_weight(1, 16, 0.02), random_router(7, 1, 3, 16, 0.02))
    z = recipes.mix_recipe(cfg_of(tmp_path, "mix.router_init=zeros")).router_weight(0, 16, 0.02)
    assert z.dtype == np.float32 and z.shape == (3, 16) and not z.any()
    data = recipes.mix_recipe(cfg_of(tmp_path, "mix.router_init=data"))
    assert data.router_weight(0, 16, 0.02) is None and data.expert_sources == (0, 1, 2)
    refused = [
        (["mix.blended=true"], "blended experts mix every domain"),
        (["mix.experts=[a,b,c]"], "the domain of"),
        (["mix.router_init_batches=0"], "mix.router_init_batches=0"),
    ]
    for extra, message in refused:
        with pytest.raises(ConfigError, match=message):
            recipes.mix_recipe(cfg_of(tmp_path, "mix.router_init=data", *extra))
    with pytest.raises(ConfigError, match="upcycling copies one FFN"):
        recipes.upcycle_recipe(cfg_of(tmp_path, "mix.router_init=data"))


def test_sources_must_differ_and_not_be_overwritten(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"used twice \(code and math\)"):
        recipes.mix_recipe(cfg_of(tmp_path, f"mix.experts=[{tmp_path / 'a'},{tmp_path / 'link'}]"))
    with pytest.raises(ConfigError, match="mix.seed_checkpoint=.*used twice"):  # default experts
        recipes.mix_recipe(cfg_of(tmp_path, f"mix.seed_checkpoint={RunDir(tmp_path).expert('math') / 'weights'}"))
    with pytest.raises(ConfigError, match="no sources"):
        recipes.mix_recipe(cfg_of(tmp_path, "mix.experts=[]", "mix.include_seed=false"))
    r = recipes.mix_recipe(cfg_of(tmp_path))
    recipes.check_out(tmp_path / "elsewhere", r.sources)
    for out in (r.sources[1].path, tmp_path / "experts"):
        with pytest.raises(ConfigError, match="would overwrite the source"):
            recipes.check_out(out, r.sources)


def test_architecture_check():
    ref = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
           "num_query_groups": None, "kv_channels": None, "vocab_size": 256, "activation": "swiglu",
           "normalization": "RMSNorm", "untie_embeddings_and_output_weights": True}
    recipes.check_architecture(("the config", ref), [("/a", dict(ref)), ("/b", None)])
    with pytest.raises(CheckpointError) as err:
        recipes.check_architecture(("/a", ref), [("/b", dict(ref)), ("/c", {**ref, "vocab_size": 300})])
    assert str(err.value) == ("/c: model.vocab_size=300, but /a has 256; all sources must have "
                              "the same architecture")
    # the fields a checkpoint must match its config on: one tuple (config/schema.py)
    from nemo_btx.config.schema import SHAPE_FIELDS
    from nemo_btx.training import checkpoint

    assert recipes.ARCHITECTURE_FIELDS is SHAPE_FIELDS is checkpoint.SHAPE_FIELDS
