"""`nemo-btx data` on bad input: one clear error naming the key, and nothing that looks complete.

An error found while planning (the config, the sources' names and sizes) writes nothing at
all; one found while reading or merging leaves no manifest for the domain it concerns.
"""

import json

import pytest

from nemo_btx.data.tokenizer import train_bpe
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.stages import data

from data_fixtures import small_config


def _fail(run_dir, *overrides, error=ConfigError, planning: bool = True) -> BtxError:
    cfg = small_config(run_dir, *overrides)
    with pytest.raises(error) as err:
        data.run(cfg)
    if planning:
        assert not run_dir.exists(), "a data stage that fails while planning must write nothing"
    assert not list(run_dir.glob("data/*/manifest.json")), "a failed domain must not look complete"
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
    """One document cannot be both trained on and held out: the merge says so, and the domain
    gets no manifest (the tokenizer and the tokenized piece may stay: they are not data)."""
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "only one"}) + "\n" + json.dumps({"text": " "}) + "\n")
    err = _fail(tmp_path / "run", f"data.domains=[{{name: x, source: '{tmp_path}/one.jsonl'}}]", planning=False)
    assert err.key == "data.valid_fraction" and "domain 'x'" in str(err) and "(of 1)" in str(err)


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


@pytest.mark.parametrize("key", ["chunk_size", "unit_size", "buffer_size"])
def test_bad_sizes(tmp_path, key):
    err = _fail(tmp_path / "run", f"data.{key}=lots", "data.domains=[{name: math}]")
    assert err.key == f"data.{key}" and "lots" in str(err)


def test_steps_need_their_unit_or_domain(tmp_path):
    run_dir = tmp_path / "run"
    # Before the tokenizer exists, a tokenize step says which step to run first.
    with pytest.raises(BtxError, match="data.step=tokenizer"):
        data.run(small_config(run_dir, "data.domains=[{name: math}]", "data.step=tokenize", "data.unit=math:0"))
    assert not list(run_dir.glob("data/*/manifest.json"))
    data.run(small_config(run_dir, "data.domains=[{name: math}]", "data.step=tokenizer"))
    err = _fail(run_dir, "data.domains=[{name: math}]", "data.step=tokenize", planning=False)
    assert err.key == "data.unit" and "math:0" in str(err)
    err = _fail(run_dir, "data.domains=[{name: math}]", "data.step=tokenize", "data.unit=math:7", planning=False)
    assert err.key == "data.unit" and "must be one of math:0" in str(err)
    err = _fail(run_dir, "data.domains=[{name: math}]", "data.step=merge", planning=False)
    assert err.key == "domain"
    err = _fail(run_dir, "data.domains=[{name: math}]", "data.step=merge", "domain=code", planning=False)
    assert err.key == "domain" and "must be one of math" in str(err)
    # A merge before its pieces are tokenized names the unit to run.
    err = _fail(run_dir, "data.domains=[{name: math}]", "data.step=merge", "domain=math", error=BtxError,
                planning=False)
    assert "tokenize:math:0" in str(err)
