"""import-hf / export-hf for each seed family: Llama-3 (llama3 and linear RoPE scaling), Mistral,
Qwen2 (q/k/v biases, tied embeddings) and Qwen3 (q/k norms, explicit head_dim): logits equal
transformers', exports are bit-identical, an MoE exports to the family's MoE class with the
megatron-core MoE's logits, and what megatron-core would compute differently is refused."""

import json

import pytest
import torch

from hf_models import (FAMILIES, LLAMA, assert_logits_close, bitwise_equal, hf_logits, make_family,
                       megatron_logits, perturb_norms, safetensors_of)
from nemo_btx.config import load_config


def _import(hf_dir, out, *overrides):
    from nemo_btx.stages.hf import import_hf

    return import_hf(load_config([f"hf.path={hf_dir}", f"hf.out={out}", *overrides]))


def _export(checkpoint, out, *overrides):
    from nemo_btx.stages.hf import export_hf

    return export_hf(load_config([f"hf.path={checkpoint}", f"hf.out={out}", *overrides]))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = make_family(root / "hf", request.param)
    return request.param, hf_dir, _import(hf_dir, root / "imported")


def _marker_model(checkpoint):
    return json.loads((checkpoint / "btx_checkpoint.json").read_text())["model"]


def test_import_records_the_family_and_logits_equal_transformers(family):
    name, hf_dir, imported = family
    model = _marker_model(imported)
    want = {"llama3": ("llama", "llama3", False, False), "llama-linear": ("llama", "linear", False, False),
            "mistral": ("mistral", None, False, False), "qwen2": ("qwen2", None, True, False),
            "qwen3": ("qwen3", None, False, True)}[name]
    assert (model["family"], model["rope_scaling"], model["add_qkv_bias"], model["qk_layernorm"]) == want
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    assert_logits_close(megatron_logits(imported, tokens), hf_logits(hf_dir, tokens))


def test_export_is_bit_identical_to_the_original(family, tmp_path):
    from transformers import AutoConfig

    name, hf_dir, imported = family
    out = _export(imported, tmp_path / "back")
    before, after = safetensors_of(hf_dir), safetensors_of(out)
    if name == "qwen2":  # tied: import unties (lm_head = a copy of the embedding), export keeps it
        assert bitwise_equal(after.pop("lm_head.weight"), before["model.embed_tokens.weight"])
    assert sorted(before) == sorted(after)
    assert [n for n in before if not bitwise_equal(before[n], after[n])] == []
    a, b = AutoConfig.from_pretrained(str(hf_dir)), AutoConfig.from_pretrained(str(out))
    assert (a.architectures, a.model_type) == (b.architectures, b.model_type)
    assert a.rope_parameters == b.rope_parameters


@pytest.mark.parametrize("length", [200], ids=["beyond-max-positions"])
def test_linear_scaling_beyond_the_trained_context(tmp_path, length):
    """linear: positions past max_position_embeddings (128) computed as transformers does."""
    hf_dir = make_family(tmp_path / "hf", "llama-linear", tokenizer=False)
    imported = _import(hf_dir, tmp_path / "imported", f"model.seq_length={length}")
    tokens = torch.randint(0, LLAMA["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1))
    assert_logits_close(megatron_logits(imported, tokens), hf_logits(hf_dir, tokens))


def test_llama3_scaling_beyond_the_original_context(tmp_path):
    """llama3: 8,300 positions, past the original 8,192 context the scaling is built around."""
    hf_dir = make_family(tmp_path / "hf", "llama3", tokenizer=False, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    imported = _import(hf_dir, tmp_path / "imported", "model.seq_length=8300")
    tokens = torch.randint(0, LLAMA["vocab_size"], (1, 8300), generator=torch.Generator().manual_seed(2))
    ours, theirs = megatron_logits(imported, tokens), hf_logits(hf_dir, tokens)
    assert_logits_close(ours[:, 8192:], theirs[:, 8192:])
    assert_logits_close(ours, theirs)


SMALL_MOE = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96",
             "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=300",
             "model.seq_length=32", "model.moe.num_experts=4", "model.moe.router_topk=2"]
#: An MoE of each family as our config says it, and the Hugging Face class it exports to.
MOE_FAMILIES = {
    "mistral": (["model.family=mistral", "model.rotary_base=1000000"], "MixtralForCausalLM"),
    "llama3": (["model.rope_scaling=llama3", "model.rotary_base=500000", "model.kv_channels=16"],
               "MixtralForCausalLM"),
    "qwen3": (["model.family=qwen3", "model.qk_layernorm=true", "model.kv_channels=32"],
              "Qwen3MoeForCausalLM"),
}


def _random_moe(root, overrides):
    """A run directory holding a random MoE (norms, router moved off their init) and a tokenizer."""
    from nemo_btx.data.tokenizer import save_tokenizer, train_bpe
    from nemo_btx.evaluation.model import ensure_runtime
    from nemo_btx.model.build import build_model
    from nemo_btx.training.checkpoint import save_model_weights

    cfg = load_config([f"run.dir={root}", *SMALL_MOE, *overrides])
    ensure_runtime(cfg)  # one process, TP=PP=1: shared with the logits' models
    torch.manual_seed(3)
    (model,) = build_model(cfg, wrap_ddp=False)
    perturb_norms(model.named_parameters())
    with torch.no_grad():  # a trained router: distinct top-k choices per token
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, 0.5)
    save_model_weights([model], root / "weights", cfg.model)
    save_tokenizer(train_bpe(["def f(x): return x\n" * 20, "two plus two is four\n" * 20], 300), root)
    return root / "weights"


@pytest.mark.parametrize("name", list(MOE_FAMILIES))
def test_moe_exports_to_the_family_moe_class_with_equal_logits(tmp_path, name):
    from transformers import AutoConfig

    overrides, cls = MOE_FAMILIES[name]
    weights = _random_moe(tmp_path, overrides)
    out = _export(weights, tmp_path / "hf", f"run.dir={tmp_path}")
    config = AutoConfig.from_pretrained(str(out))
    assert config.architectures == [cls]
    if name == "llama3":
        assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert_logits_close(hf_logits(out, tokens), megatron_logits(weights, tokens))


def test_qwen2_moe_is_refused_with_the_reason(tmp_path):
    from nemo_btx.hf.config import UnsupportedModelError

    weights = _random_moe(tmp_path, ["model.family=qwen2", "model.add_qkv_bias=true"])
    with pytest.raises(UnsupportedModelError, match="model.family='qwen2': .*shared expert"):
        _export(weights, tmp_path / "hf", f"run.dir={tmp_path}")
    assert not (tmp_path / "hf").exists()


def _edited(src, dst, **edit):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **edit}))
    return dst


REFUSALS = {
    "rope-yarn": ("llama3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
                  r"rope_parameters.rope_type='yarn': megatron-core computes RoPE scaling of type"),
    "llama3-band": ("llama3", dict(rope_parameters={**FAMILIES["llama3"][1]["rope_parameters"],
                                                    "low_freq_factor": 2.0}),
                    r"rope_parameters.low_freq_factor=2.0: megatron-core's llama3 scaling fixes it at 1"),
    "sliding-window": ("mistral", dict(sliding_window=16),
                       r"sliding_window=16: a window shorter than model.seq_length=128"),
    "qwen-window": ("qwen2", dict(use_sliding_window=True, sliding_window=64), r"sliding_window=64"),
    "qwen3-bias": ("qwen3", dict(attention_bias=True), r"attention_bias=True: biases are not supported"),
    "architecture": ("mistral", dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"]),
                     r"model_type='gemma2': only LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                     r"Qwen3ForCausalLM import"),
    "quantised": ("qwen3", dict(quantization_config={"quant_method": "awq", "bits": 4}),
                  r"quantization_config='awq': quantized weights do not import"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_naming_the_key(tmp_path, case):
    from nemo_btx.hf.config import UnsupportedModelError

    name, edit, message = REFUSALS[case]
    src = make_family(tmp_path / "src", name, tokenizer=False, num_hidden_layers=1)
    bad = _edited(src, tmp_path / "bad", **edit)
    with pytest.raises(UnsupportedModelError) as err:
        _import(bad, tmp_path / "out")
    text = str(err.value)
    assert text.startswith(str(bad / "config.json") + ": ") and "\n" not in text, text
    assert __import__("re").search(message, text), text
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    from nemo_btx.errors import CheckpointError

    from tokenizers import Tokenizer

    src = make_family(tmp_path / "src", "qwen3", num_hidden_layers=1)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_special_tokens([f"<extra_{i}>" for i in range(400 - tok.get_vocab_size())])
    tok.save(str(src / "tokenizer.json"))  # ids up to 399 for an embedding of 300 rows
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: produces ids up to 399 but config\.json "
                                              r"vocab_size=300"):
        _import(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _hf_mix(experts, out, *overrides):
    from nemo_btx.stages.mix import run

    run(load_config(["mix.experts=[" + ",".join(str(p) for p in experts) + "]", f"mix.out={out}",
                     "mix.include_seed=false", *overrides]))
    return out


def test_hf_merge_of_identical_experts_gives_the_dense_logits(family, tmp_path):
    """`nemo-btx mix` of three copies of one Hugging Face model (no torch in the merge): the
    family's MoE class computes the dense model's logits; Qwen2 has none and is refused."""
    import shutil

    from nemo_btx.hf.config import UnsupportedModelError

    name, hf_dir, _ = family
    copies = [shutil.copytree(hf_dir, tmp_path / f"copy{i}") for i in range(3)]
    if name == "qwen2":
        with pytest.raises(UnsupportedModelError, match="shared expert"):
            _hf_mix(copies, tmp_path / "moe")
        assert not (tmp_path / "moe").exists()
        return
    out = _hf_mix(copies, tmp_path / "moe")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [MOE_FAMILIES.get(name, MOE_FAMILIES["llama3"])[1]]
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    assert_logits_close(hf_logits(out, tokens), hf_logits(hf_dir, tokens))


@pytest.mark.slow
def test_hf_merge_equals_import_mix_export_for_qwen3(tmp_path):
    """Qwen3 experts merged straight to Qwen3-MoE equal, bit for bit, import-hf -> megatron mix
    -> export-hf (q/k norms averaged like every shared tensor, the random router drawn alike)."""
    import subprocess
    import sys

    from conftest import REPO, clean_env
    from nemo_btx.stages.hf import export_hf

    experts = [make_family(tmp_path / f"e{i}", "qwen3", seed=i) for i in range(2)]
    imported = [_import(e, tmp_path / f"imp{i}") for i, e in enumerate(experts)]
    manifest = json.loads((imported[0] / "manifest.json").read_text())
    mixed = tmp_path / "mixed"
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_btx.cli", "mix", f"run.dir={tmp_path / 'run'}",
         "mix.experts=[" + ",".join(str(p) for p in imported) + "]", "mix.include_seed=false",
         "mix.average_weights=[1,3]", f"mix.out={mixed}", *manifest["overrides"]],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = export_hf(load_config([f"hf.path={mixed}", f"hf.out={tmp_path / 'exported'}"]))
    direct = _hf_mix(experts, tmp_path / "direct", "mix.average_weights=[1,3]")
    a, b = safetensors_of(direct), safetensors_of(exported)
    assert sorted(a) == sorted(b) and any(".q_norm." in n for n in a)
    assert [n for n in a if not bitwise_equal(a[n], b[n])] == []
    assert json.loads((direct / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]


def test_export_carries_a_bos_the_run_added(tmp_path):
    """A run that put a BOS before every document (data.tokenizer.add_bos=true on a tokenizer
    whose own files add none) exports a tokenizer with which transformers encodes the same ids."""
    import sys

    from transformers import AutoTokenizer

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "data"))
    from hf_tokenizers import QWEN_EOS, write_qwen_tokenizer
    from nemo_btx.config.schema import TokenizerConfig
    from nemo_btx.data.tokenizer import load_hf, save_tokenizer

    (tmp_path / "tok").mkdir()
    write_qwen_tokenizer(tmp_path / "tok", bos_token="<|endoftext|>")  # named, never added
    tok = load_hf(TokenizerConfig(kind="hf", path=str(tmp_path / "tok"), add_bos=True,
                                  eod_token=QWEN_EOS))
    assert tok.bos_id is not None
    weights = _random_moe(tmp_path, ["model.family=qwen3", "model.qk_layernorm=true",
                                     "model.moe.num_experts=null"])
    save_tokenizer(tok, tmp_path)  # the run's tokenizer replaces the BPE _random_moe saved
    out = _export(weights, tmp_path / "hf", f"run.dir={tmp_path}")
    text = "The cat sat on the mat."
    ids = AutoTokenizer.from_pretrained(str(out))(text)["input_ids"]
    assert ids == tok.encode_documents([text])[0][:-1]  # BOS + text, as the run stored it
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == tok.bos_id
