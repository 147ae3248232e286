"""`nemo-btx data` on bad input: one clear error naming the key, and nothing written."""

import json

import pytest

from nemo_btx.data.tokenizer import train_bpe
from nemo_btx.errors import ConfigError
from nemo_btx.stages import data

from data_fixtures import small_config


def _fail(run_dir, *overrides) -> ConfigError:
    cfg = small_config(run_dir, *overrides)
    with pytest.raises(ConfigError) as err:
        data.run(cfg)
    assert not run_dir.exists(), "a failed data stage must write nothing"
    assert "\n" not in str(err.value)
    return err.value


def test_missing_path(tmp_path):
    err = _fail(tmp_path / "run", f"data.domains=[{{name: code}}, {{name: x, source: '{tmp_path}/nope.jsonl'}}]")
    assert err.key == "data.domains.1.source" and "nope.jsonl" in str(err)


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    err = _fail(tmp_path / "run", f"data.domains=[{{name: x, source: '{tmp_path}/empty.txt'}}]")
    assert err.key == "data.domains.0.source" and "empty" in str(err)


def test_source_with_a_single_document(tmp_path):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "only one"}) + "\n" + json.dumps({"text": " "}) + "\n")
    err = _fail(tmp_path / "run", f"data.domains=[{{name: x, source: '{tmp_path}/one.jsonl'}}]")
    assert err.key == "data.domains.0.source" and "at least 2" in str(err)


def test_tokenizer_larger_than_model_vocab(tmp_path):
    texts = [f"word{i} " * 3 + f"other{i * 7}" for i in range(400)]
    tok = train_bpe(texts, 700)
    assert tok.vocab_size > 512
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    err = _fail(tmp_path / "run", "data.tokenizer.kind=hf", f"data.tokenizer.path={tmp_path}",
                "data.domains=[{name: math}]")
    assert err.key == "model.vocab_size"
    assert str(tok.vocab_size) in str(err) and "512" in str(err)


def test_hf_without_path(tmp_path):
    err = _fail(tmp_path / "run", "data.tokenizer.kind=hf", "data.domains=[{name: math}]")
    assert err.key == "data.tokenizer.path"


def test_valid_fraction_out_of_range(tmp_path):
    err = _fail(tmp_path / "run", "data.valid_fraction=1.0")
    assert err.key == "data.valid_fraction"
