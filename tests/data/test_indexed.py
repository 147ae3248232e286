"""The indexed datasets hold exactly the documents, split by document, vouched for by per-domain manifests."""

import json
import os

import pytest

from nemo_btx.data import indexed
from nemo_btx.data.tokenizer import load_tokenizer
from nemo_btx.errors import BtxError
from nemo_btx.stages import data

from data_fixtures import built_run, dataset_texts, expected_splits, small_config  # noqa: F401 - built_run is a fixture


def test_datasets_read_back_exactly(built_run):
    cfg, run_dir, manifest = built_run
    tok = load_tokenizer(run_dir)
    assert set(manifest["domains"]) == {"code", "math", "wiki"}
    for name in manifest["domains"]:
        entry = manifest["domains"][name]
        for split, docs in expected_splits(cfg, name).items():
            prefix = indexed.dataset_prefix(run_dir, name, split)
            assert prefix == str(run_dir / "data" / name / split)
            assert dataset_texts(prefix, tok) == docs
            assert len(docs) == entry["splits"][split]["documents"]
            assert sum(len(tok.encode(d)) + 1 for d in docs) == entry["splits"][split]["tokens"]


def test_split_is_by_document_disjoint_and_recorded(built_run):
    cfg, run_dir, manifest = built_run
    for name, entry in manifest["domains"].items():
        splits = expected_splits(cfg, name)
        train, valid = splits["train"], splits["valid"]
        assert train and valid and not set(train) & set(valid)
        assert entry["splits"]["valid"]["documents"] == len(valid)
        assert entry["pieces"] == 1  # a capped domain is one piece, read in order
        assert entry["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    assert manifest["domains"]["math"]["duplicates"] > 0  # the generator repeats a few problems
    assert manifest["domains"]["wiki"]["source"]["gensim"] == "4.4.0"
    assert manifest["tokenizer"]["vocab_size"] <= 512
    assert {"torch", "megatron-core", "tokenizers"} <= set(manifest["domains"]["code"]["versions"])


def test_stage_skips_when_complete_and_rebuilds_on_change(tmp_path):
    run_dir = tmp_path / "run"
    cfg = small_config(run_dir, "data.domains=[{name: math}]", "data.max_chars_per_domain=20000")
    first = data.run(cfg)
    stamps = {p: os.stat(p).st_mtime_ns for p in (indexed.domain_manifest_path(run_dir, "math"),
                                                   run_dir / "tokenizer" / "meta.json",
                                                   run_dir / "data" / "math" / "parts" / "000000.json")}
    assert data.run(cfg) == first
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps

    changed = small_config(run_dir, "data.domains=[{name: math}]", "data.max_chars_per_domain=20000",
                           "data.valid_fraction=0.5")
    second = data.run(changed)
    assert second["domains"]["math"]["splits"]["valid"]["documents"] > \
        first["domains"]["math"]["splits"]["valid"]["documents"]
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def test_incomplete_domain_is_never_read(tmp_path):
    run_dir = tmp_path / "run"
    cfg = small_config(run_dir, "data.domains=[{name: math}, {name: code}]", "data.max_chars_per_domain=20000")
    data.run(cfg)
    prefix = indexed.dataset_prefix(run_dir, "math", "train")
    with open(prefix + ".bin", "ab") as f:  # a torn write: the size no longer matches
        f.write(b"\0\0")
    with pytest.raises(BtxError, match="does not match its manifest"):
        indexed.dataset_prefix(run_dir, "math", "train")
    # A domain directory without its manifest (a merge that did not complete) is never read.
    indexed.domain_manifest_path(run_dir, "code").unlink()
    with pytest.raises(BtxError, match="merge has not completed"):
        indexed.dataset_prefix(run_dir, "code", "valid")
    assert indexed.read_manifest(run_dir, ["math", "code"]) is None
    with pytest.raises(BtxError, match="no complete dataset for code"):
        indexed.require_manifest(run_dir, ["math", "code"])
    # A manifest of another format is not vouching for anything either.
    path = indexed.domain_manifest_path(run_dir, "math")
    old = json.loads(path.read_text())
    path.write_text(json.dumps({**old, "format": 1}))
    assert indexed.read_domain_manifest(run_dir, "math") is None
    # The stage notices and rebuilds both; then everything is readable again.
    manifest = data.run(cfg)
    assert set(manifest["domains"]) == {"math", "code"}
    indexed.dataset_prefix(run_dir, "code", "valid")
    indexed.dataset_prefix(run_dir, "math", "train")
    assert indexed.read_manifest(run_dir, ["math", "code"]) == manifest


def test_manifest_assembles_the_domains(built_run):
    _, run_dir, manifest = built_run
    assert indexed.read_manifest(run_dir) == manifest  # every domain with a manifest
    assert list(indexed.read_manifest(run_dir, ["wiki"])["domains"]) == ["wiki"]
    assert indexed.document_subset(run_dir, "wiki", "train") is None  # a whole dataset
    with pytest.raises(ValueError, match="split must be one of"):
        indexed.dataset_prefix(run_dir, "wiki", "test")


def test_other_ranks_wait_for_current_data(tmp_path, monkeypatch):
    """Under torchrun only rank 0 builds; the others return once every domain is current for
    their config, never a complete dataset of an earlier config."""
    run_dir = tmp_path / "run"
    cfg = small_config(run_dir, "data.domains=[{name: math}]", "data.max_chars_per_domain=20000")
    manifest = data.run(cfg)
    monkeypatch.setenv("RANK", "1")
    assert data.run(cfg) == manifest
    monkeypatch.setattr(data, "WAIT_SECONDS", 0.2)
    changed = small_config(run_dir, "data.domains=[{name: math}]", "data.max_chars_per_domain=20000",
                           "data.valid_fraction=0.5")
    with pytest.raises(BtxError, match="rank 0 did not complete"):
        data.run(changed)
