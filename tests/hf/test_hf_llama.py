"""import-hf / export-hf for dense Llama models: exact round trip, equal logits, tokenizer, refusals."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env
from hf_models import (
    LLAMA, assert_logits_close, bitwise_equal, hf_logits, make_llama, megatron_logits,
    safetensors_of)
from nemo_btx.config import load_config


def _import(hf_dir, out, *overrides):
    from nemo_btx.stages.hf import import_hf

    return import_hf(load_config([f"hf.path={hf_dir}", f"hf.out={out}", *overrides]))


def _export(checkpoint, out, *overrides):
    from nemo_btx.stages.hf import export_hf

    return export_hf(load_config([f"hf.path={checkpoint}", f"hf.out={out}", *overrides]))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A sharded GQA Llama with a tokenizer, and its import."""
    root = tmp_path_factory.mktemp("llama")
    hf_dir = make_llama(root / "hf")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 2
    return hf_dir, _import(hf_dir, root / "imported")


def test_round_trip_is_bit_identical(llama, tmp_path):
    hf_dir, imported = llama
    out = _export(imported, tmp_path / "back", "hf.max_shard_size=60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    before, after = safetensors_of(hf_dir), safetensors_of(out)
    assert sorted(before) == sorted(after)
    assert [name for name in before if not bitwise_equal(before[name], after[name])] == []
    a, b = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_parameters", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert a[key] == b[key], key


def test_imported_logits_equal_transformers(llama):
    hf_dir, imported = llama
    torch.manual_seed(0)
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 24))
    assert_logits_close(megatron_logits(imported, tokens), hf_logits(hf_dir, tokens))


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.slow
def test_training_loss_is_transformers_loss_at_tp1_and_tp2(llama, tmp_path):
    """Vocabulary 300 is padded to 384 rows at TP=1 and 512 at TP=2 (zeros on import). The
    padding is kept out of megatron's cross entropy, so the training loss of the imported
    model is transformers' loss, at both layouts (with the padding in the softmax it was 5.96
    at TP=1 and 6.25 at TP=2)."""
    from conftest import run_torchrun
    from nemo_btx.training.batches import synthetic_global_batch
    from transformers import AutoModelForCausalLM

    hf_dir, imported = llama
    base = [*json.loads((imported / "manifest.json").read_text())["overrides"],
            "model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4"]
    worker = REPO / "tests" / "mixing" / "mix_worker.py"
    proc = subprocess.run([sys.executable, str(worker), "loss", str(imported), str(tmp_path / "tp1.json"),
                           *base], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_torchrun(worker, ["loss", imported, tmp_path / "tp2.json", *base, "parallel.tp=2",
                          "parallel.world_size=2"], nproc=2, timeout=300)
    tp1, tp2 = (json.loads((tmp_path / f"{n}.json").read_text())["losses"] for n in ("tp1", "tp2"))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    cfg = load_config(base)
    for step, (a, b) in enumerate(zip(tp1, tp2)):
        tokens = synthetic_global_batch(cfg, step)
        with torch.no_grad():
            logits = model(tokens[:, :-1]).logits
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                tokens[:, 1:].reshape(-1)).item()
        assert a == pytest.approx(ref, rel=1e-5) and b == pytest.approx(ref, rel=1e-5), (a, b, ref)


def test_mqa_head_dim_theta_and_tied_embeddings(tmp_path):
    """One kv head, head_dim != hidden/heads, another rope theta and eps, tied embeddings (untied
    on import: the output layer is a copy of the embedding): still the same logits."""
    from nemo_btx.training.checkpoint import read_tensors

    hf_dir = make_llama(tmp_path / "hf", seed=1, max_shard_size="5GB", tokenizer=False,
                        num_key_value_heads=1, head_dim=8, rope_theta=500000.0, rms_norm_eps=1e-6,
                        tie_word_embeddings=True)
    assert "lm_head.weight" not in safetensors_of(hf_dir)
    imported = _import(hf_dir, tmp_path / "imported")
    t = read_tensors(imported)
    assert torch.equal(t["output_layer.weight"], t["embedding.word_embeddings.weight"])
    manifest = json.loads((imported / "manifest.json").read_text())
    assert {"model.num_query_groups=1", "model.kv_channels=8", "model.rotary_base=500000",
            "model.norm_epsilon=1e-06"} <= set(manifest["overrides"])
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    assert_logits_close(megatron_logits(imported, tokens), hf_logits(hf_dir, tokens))


def test_tokenizer_goes_in_and_out(llama, tmp_path):
    from transformers import AutoTokenizer

    from nemo_btx.config.schema import TokenizerConfig
    from nemo_btx.data.tokenizer import load_hf

    hf_dir, imported = llama
    copied = imported / "tokenizer"
    assert (copied / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    tok = load_hf(TokenizerConfig(kind="hf", path=str(copied)))  # what the data stage loads
    assert tok.eod_token == "<|endoftext|>"
    out = _export(imported, tmp_path / "back")
    text = "def g(y):\n    return y * 12"
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == tok.encode(text)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.eod_id


def test_bfloat16_import_and_export(llama, tmp_path):
    hf_dir, imported = llama
    out = _export(imported, tmp_path / "bf16", "hf.dtype=bfloat16")
    before, after = safetensors_of(hf_dir), safetensors_of(out)
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    assert all(torch.equal(before[n].to(torch.bfloat16), after[n]) for n in before)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("edit, key", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_scaling\.rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_import_refuses_what_is_not_llama(llama, tmp_path, edit, key):
    from nemo_btx.hf.config import UnsupportedModelError

    hf_dir, _ = llama
    bad = tmp_path / "bad"
    bad.mkdir()
    config = {**json.loads((hf_dir / "config.json").read_text()), **edit}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: {key}="):
        _import(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_refusal_is_one_line(llama, tmp_path):
    hf_dir, _ = llama
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", "import-hf", f"hf.path={bad}",
                           f"hf.out={tmp_path / 'out'}"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("nemo-btx:")]
    assert lines == [f"nemo-btx: error: {bad / 'config.json'}: attention_bias=True: biases are not "
                     "supported (megatron-core adds biases to the query/key/value projection only, "
                     "as Qwen2 has them)"]
    assert "Traceback" not in proc.stderr


def test_import_refuses_missing_or_extra_tensors(llama, tmp_path):
    from safetensors.torch import save_file

    from nemo_btx.errors import CheckpointError

    hf_dir, _ = llama
    weights = safetensors_of(hf_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copyfile(hf_dir / "config.json", bad / "config.json")
    save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
              str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj.bias' has no megatron-core counterpart"):
        _import(bad, tmp_path / "out")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        _import(bad, tmp_path / "out")


@pytest.mark.slow
def test_imported_model_becomes_the_seed_and_exports_back(tmp_path):
    """The commands import-hf logs, as a user runs them: the HF tokenizer builds the data, the
    seed stage adopts the import, and the seed exported again is the original, bit for bit."""
    hf_dir = make_llama(tmp_path / "hf", seed=2)
    rd = tmp_path / "run"

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "nemo_btx.cli", *map(str, args)], cwd=REPO,
                              env=clean_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    log = cli("import-hf", f"run.dir={rd}", f"hf.path={hf_dir}")
    steps = [m.group(1).split() for m in re.finditer(r"\s nemo-btx ((?:data|seed) .*)$", log, re.M)]
    assert [s[0] for s in steps] == ["data", "seed"]
    cli(*steps[0], "data.max_chars_per_domain=20000", "model.seq_length=64")
    cli(*steps[1], "model.seq_length=64")
    manifest = json.loads((rd / "seed" / "manifest.json").read_text())
    assert manifest["adopted_from"] == str((rd / "imported").resolve())
    out = _export(rd / "seed" / "weights", tmp_path / "seed-hf")
    before, after = safetensors_of(hf_dir), safetensors_of(out)
    assert [name for name in before if not bitwise_equal(before[name], after[name])] == []
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
