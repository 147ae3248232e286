"""The indexed datasets hold exactly the documents, split by document, vouched for by the manifest."""

import json
import os
import shutil

import pytest

from nemo_btx.data import corpora, indexed
from nemo_btx.data.tokenizer import BPE_EOD, load_tokenizer
from nemo_btx.errors import BtxError
from nemo_btx.stages import data

from data_fixtures import built_run, small_config  # noqa: F401 - built_run is a fixture


def _expected_splits(cfg):
    out = {}
    for src in corpora.resolve_sources(cfg.data):
        docs = corpora.read_documents(src, cfg.data)
        out[src.name] = dict(zip(indexed.SPLITS, indexed.split_documents(
            docs, cfg.data.valid_fraction, cfg.data.seed, src.name)))
    return out


def test_datasets_read_back_exactly(built_run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cfg, run_dir, manifest = built_run
    tok = load_tokenizer(run_dir)
    expected = _expected_splits(cfg)
    assert set(manifest["domains"]) == {"code", "math", "wiki"}
    for name, splits in expected.items():
        entry = manifest["domains"][name]
        for split, docs in splits.items():
            ds = IndexedDataset(indexed.dataset_prefix(run_dir, name, split))
            assert len(ds) == len(docs) == entry["splits"][split]["documents"]
            assert sum(len(ds[i]) for i in range(len(ds))) == entry["splits"][split]["tokens"]
            for i, doc in enumerate(docs):
                ids = ds[i].tolist()
                assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
                assert tok.decode(ids) == doc + BPE_EOD


def test_split_is_by_document_disjoint_and_sized(built_run):
    cfg, _, manifest = built_run
    for name, splits in _expected_splits(cfg).items():
        train, valid = splits["train"], splits["valid"]
        assert not set(train) & set(valid)
        n = len(train) + len(valid)
        assert len(valid) == max(1, round(n * cfg.data.valid_fraction))
    assert manifest["domains"]["wiki"]["source"]["gensim"] == "4.4.0"
    assert manifest["tokenizer"]["vocab_size"] <= 512
    assert {"torch", "megatron-core", "tokenizers"} <= set(manifest["versions"])


def test_split_edge_cases():
    docs = [f"d{i}" for i in range(10)]
    train, valid = indexed.split_documents(docs, 0.01, 1, "x")
    assert len(valid) == 1 and len(train) == 9
    train, valid = indexed.split_documents(docs[:2], 0.9, 1, "x")
    assert len(valid) == 1 and len(train) == 1
    assert indexed.split_documents(docs, 0.3, 1, "x") == indexed.split_documents(docs, 0.3, 1, "x")
    assert indexed.split_documents(docs, 0.3, 1, "x") != indexed.split_documents(docs, 0.3, 1, "y")


def test_stage_skips_when_complete_and_rebuilds_on_change(tmp_path):
    run_dir = tmp_path / "run"
    cfg = small_config(run_dir, "data.domains=[{name: math}]", "data.max_chars_per_domain=20000")
    first = data.run(cfg)
    stamp = os.stat(indexed.manifest_path(run_dir)).st_mtime_ns
    assert data.run(cfg) == first
    assert os.stat(indexed.manifest_path(run_dir)).st_mtime_ns == stamp

    changed = small_config(run_dir, "data.domains=[{name: math}]", "data.max_chars_per_domain=20000",
                           "data.valid_fraction=0.2")
    second = data.run(changed)
    assert second["domains"]["math"]["splits"]["valid"]["documents"] > \
        first["domains"]["math"]["splits"]["valid"]["documents"]
    assert not list((run_dir / "data").glob(".*.tmp.*"))


def test_incomplete_domain_is_never_read(tmp_path):
    run_dir = tmp_path / "run"
    cfg = small_config(run_dir, "data.domains=[{name: math}, {name: code}]", "data.max_chars_per_domain=20000")
    data.run(cfg)
    prefix = indexed.dataset_prefix(run_dir, "math", "train")
    with open(prefix + ".bin", "ab") as f:  # a torn write: the size no longer matches
        f.write(b"\0\0")
    with pytest.raises(BtxError, match="does not match its manifest"):
        indexed.dataset_prefix(run_dir, "math", "train")
    manifest = json.loads(indexed.manifest_path(run_dir).read_text())
    del manifest["domains"]["code"]
    indexed.manifest_path(run_dir).write_text(json.dumps(manifest))
    with pytest.raises(BtxError, match="not in .*manifest"):
        indexed.dataset_prefix(run_dir, "code", "valid")
    # The stage notices and rebuilds; then everything is readable again.
    data.run(cfg)
    indexed.dataset_prefix(run_dir, "code", "valid")
    indexed.dataset_prefix(run_dir, "math", "train")
    indexed.manifest_path(run_dir).unlink()
    with pytest.raises(BtxError, match="data stage has not completed"):
        indexed.dataset_prefix(run_dir, "math", "train")
    shutil.rmtree(run_dir)
