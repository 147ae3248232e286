"""The streaming data stage: user corpora cut into many pieces (2 KB chunks) give the same bytes
whatever the workers, the input format or the interruptions; a changed file redoes its pieces
only; bad records fail in one line or are counted; an existing megatron dataset is a domain.

Every corpus here is generated (a few tens of KB) and the vocabulary is 512, so each build
takes about a second."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from nemo_btx.config.validate import check_data
from nemo_btx.data import indexed, plan as planning, shards
from nemo_btx.data.documents import held_out_positions
from nemo_btx.data.loader import TrainData, validation_batches
from nemo_btx.data.tokenizer import BPE_EOD, Tokenizer, load_tokenizer
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.runtime import preemption
from nemo_btx.stages import data

from data_fixtures import (data_files, dataset_texts, hf_tokenizer, make_documents, split, user_config,
                           without_timing, write_jsonl)

DOCS = make_documents(300, seed=1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A fixed tokenizer (kind=hf) shared by the builds that compare bytes without a BPE."""
    return hf_tokenizer(tmp_path_factory.mktemp("hf"), DOCS)


def _corpus(root: Path) -> Path:
    """Two domains' files: `notes/` holds one .jsonl cut into byte ranges (raw UTF-8, so a range
    may start inside a character) and small ones grouped into one chunk; `more/` one more file."""
    write_jsonl(root / "notes" / "a.jsonl", DOCS[:5])
    (root / "notes" / "b.jsonl").write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS[5:200]), encoding="utf-8")
    write_jsonl(root / "notes" / "c.jsonl", DOCS[200:204])
    write_jsonl(root / "notes" / "d.jsonl", DOCS[204:210])
    write_jsonl(root / "more" / "e.jsonl", DOCS[210:])
    return root


def _domains(root: Path) -> str:
    return f"[{{name: notes, source: '{root}/notes'}}, {{name: more, source: '{root}/more/*.jsonl'}}]"


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """(cfg, run_dir, manifest, corpus) of the two-domain corpus built with one worker and a BPE."""
    root = _corpus(tmp_path_factory.mktemp("corpus"))
    run_dir = tmp_path_factory.mktemp("streamed") / "run"
    cfg = user_config(run_dir, _domains(root))
    return cfg, run_dir, data.run(cfg), root


def _markers(run_dir, domain: str) -> dict:
    parts = Path(run_dir) / "data" / domain / "parts"
    return {p.name: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}


def _stamps(run_dir, domain: str) -> dict:
    parts = Path(run_dir) / "data" / domain / "parts"
    return {p.name: p.stat().st_mtime_ns for p in sorted(parts.iterdir())}


# ------------------------------------------------------------------------------ workers


def test_many_pieces_read_back_exactly(streamed):
    cfg, run_dir, manifest, _ = streamed
    tok = load_tokenizer(run_dir)
    plans = {p.name: p for p in planning.plan_data(cfg)}
    assert len(plans["notes"].pieces) > 20 and manifest["domains"]["notes"]["pieces"] == len(plans["notes"].pieces)
    for name, docs in (("notes", DOCS[:210]), ("more", DOCS[210:])):
        expected = split(docs, cfg, name)
        assert expected["train"] and expected["valid"]
        for side, held in expected.items():
            assert dataset_texts(indexed.dataset_prefix(run_dir, name, side), tok) == held
            assert manifest["domains"][name]["splits"][side]["documents"] == len(held)


def test_output_does_not_depend_on_the_workers(streamed, tmp_path):
    cfg, run_dir, manifest, root = streamed
    other = tmp_path / "run"
    again = data.run(user_config(other, _domains(root), "data.workers=3"))
    assert load_tokenizer(other).sha256 == load_tokenizer(run_dir).sha256
    for name in ("notes", "more"):
        assert data_files(other, name) == data_files(run_dir, name)
        assert without_timing(again["domains"][name]) == without_timing(manifest["domains"][name])
        assert {k: without_timing(m) for k, m in _markers(other, name).items()} == \
            {k: without_timing(m) for k, m in _markers(run_dir, name).items()}


def test_steps_one_by_one_equal_all(streamed, tmp_path):
    """tokenizer, every tokenize unit, every merge as separate processes' steps (`launch`'s units)."""
    cfg, run_dir, _, root = streamed
    other = tmp_path / "run"
    extra = [_domains(root), "data.unit_size=8KB"]
    data.run(user_config(other, *extra, "data.step=tokenizer"))
    plans = planning.plan_data(user_config(other, *extra))
    units = [u for p in plans for u in p.unit_names()]
    assert len(units) > 3
    for unit in reversed(units):  # any order
        assert data.run(user_config(other, *extra, "data.step=tokenize", f"data.unit={unit}")) is None
    assert not list((other / "data").glob("*/manifest.json"))
    for name in ("more", "notes"):
        data.run(user_config(other, *extra, "data.step=merge", f"domain={name}"))
        assert data_files(other, name) == data_files(run_dir, name)


# ------------------------------------------------------------------------------ bounded by the piece


def test_each_piece_is_tokenized_on_its_own(streamed):
    """A worker holds one piece: each partial dataset is exactly its chunk's documents, and the
    pieces add up to the domain (nothing is carried from one piece to the next)."""
    from nemo_btx.data import readers

    cfg, run_dir, manifest, _ = streamed
    tok = load_tokenizer(run_dir)
    plan = next(p for p in planning.plan_data(cfg) if p.name == "notes")
    markers = _markers(run_dir, "notes")
    assert list(markers) == [f"{p.id}.json" for p in plan.pieces]
    for piece in plan.pieces:
        m = markers[f"{piece.id}.json"]
        assert m["input"] == piece.describe()
        expected = split(list(readers.read_chunk(piece.chunk)), cfg, "notes")
        for side in ("train", "valid"):
            texts = dataset_texts(shards.part_prefix(run_dir, "notes", piece.id, side), tok)
            assert texts == expected[side] and m["splits"][side]["documents"] == len(texts)
    for side in ("train", "valid"):
        for key in ("documents", "tokens", "chars"):
            assert sum(m["splits"][side][key] for m in markers.values()) == \
                manifest["domains"]["notes"]["splits"][side][key]


# ------------------------------------------------------------------------------ formats


def _write_format(root: Path, fmt: str, docs) -> Path:
    root.mkdir(parents=True)
    if fmt == "text":
        for i, d in enumerate(docs):
            (root / f"doc{i:04d}.txt").write_text(d, encoding="utf-8")
        return root
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=8)
        assert pq.ParquetFile(path).metadata.num_row_groups > 10
        return path
    raw = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    path = root / f"docs.{fmt}"
    if fmt == "jsonl.gz":
        raw = gzip.compress(raw)
    elif fmt == "jsonl.zst":
        zstandard = pytest.importorskip("zstandard")
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


def test_every_format_gives_the_same_datasets(tmp_path, tokenizer_dir):
    docs = DOCS[:120]
    outputs, samples = {}, {}
    for fmt in ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text"):
        source = _write_format(tmp_path / "in" / fmt, fmt, docs)
        cfg = user_config(tmp_path / fmt, f"[{{name: x, source: '{source}'}}]", tokenizer_dir=tokenizer_dir)
        data.run(cfg)
        outputs[fmt] = data_files(tmp_path / fmt, "x")
        # The BPE a kind=bpe run would train reads the same documents in the same order.
        samples[fmt] = list(data._bpe_sample(cfg, planning.plan_data(cfg), {"documents": 0, "chars": 0}))
    tok = load_tokenizer(tmp_path / "jsonl")
    expected = split(docs, user_config(tmp_path, "[{name: x}]"), "x")
    assert dataset_texts(tmp_path / "jsonl" / "data" / "x" / "train", tok) == expected["train"]
    assert all(out == outputs["jsonl"] for out in outputs.values()), \
        [fmt for fmt, out in outputs.items() if out != outputs["jsonl"]]
    assert samples["jsonl"] == expected["train"]
    assert all(s == samples["jsonl"] for s in samples.values())


# ------------------------------------------------------------------------------ incremental


def _pieces_of(plan, name: str):
    return {f"{p.id}.json" for p in plan.pieces if any(Path(f).name == name for f in p.chunk.files)}


def test_a_changed_file_redoes_its_pieces_only(tmp_path, tokenizer_dir):
    root = tmp_path / "in"
    for k, name in enumerate("abc"):
        write_jsonl(root / f"{name}.jsonl", DOCS[k * 40:(k + 1) * 40])
    run_dir = tmp_path / "run"
    cfg = user_config(run_dir, f"[{{name: x, source: '{root}'}}]", "data.unit_size=6KB",
                      tokenizer_dir=tokenizer_dir)
    data.run(cfg)
    original = data_files(run_dir, "x")
    plan = planning.plan_data(cfg)[0]
    assert len(plan.units) > 2 and len(_pieces_of(plan, "b.jsonl")) > 1
    manifest_path = indexed.domain_manifest_path(run_dir, "x")

    def rebuild(content: bytes):
        """Write b.jsonl (a later mtime), then check what the stage redid."""
        path = root / "b.jsonl"
        before_write = path.stat().st_mtime_ns
        path.write_bytes(content)
        os.utime(path, ns=(before_write + 10**9, before_write + 10**9))
        stamps, manifest_stamp = _stamps(run_dir, "x"), manifest_path.stat().st_mtime_ns
        redo = _pieces_of(plan, "b.jsonl")
        changed_units = {k for k in range(len(plan.units)) if not data.unit_done(cfg, plan, k)}
        assert changed_units == {k for k in range(len(plan.units))
                                 if {f"{p.id}.json" for p in plan.unit_pieces(k)} & redo}
        assert len(changed_units) < len(plan.units)
        data.run(cfg)
        after = _stamps(run_dir, "x")
        assert set(after) == set(stamps)
        redone = {n for n in stamps if after[n] != stamps[n]}
        assert {n for n in redone if n.endswith(".json")} == redo
        assert {n.split(".")[0] for n in redone} == {n.split(".")[0] for n in redo}
        assert manifest_path.stat().st_mtime_ns != manifest_stamp  # the merge reran
        return data_files(run_dir, "x")

    text = (root / "b.jsonl").read_bytes()
    edited = text.replace(b"Document 45:", b"Document 46:", 1)  # same size, other content
    assert edited != text and len(edited) == len(text)
    assert rebuild(edited) != original
    assert rebuild(text) == original
    assert data.run(cfg)["domains"]["x"] == indexed.read_domain_manifest(run_dir, "x")


# ------------------------------------------------------------------------------ stop request


@pytest.mark.parametrize("workers", [1, 2])
def test_stop_request_keeps_finished_pieces_and_resumes(tmp_path, tokenizer_dir, monkeypatch, workers):
    source = write_jsonl(tmp_path / "in" / "big.jsonl", DOCS[:150])
    stop = tmp_path / "stop"
    monkeypatch.setenv(preemption.STOP_FILE_ENV, str(stop))
    monkeypatch.setattr(preemption, "_requested", False)
    extra = [f"[{{name: x, source: '{source}'}}]", f"data.workers={workers}", "data.buffer_size=600"]
    run_dir = tmp_path / "run"
    cfg = user_config(run_dir, *extra, tokenizer_dir=tokenizer_dir)
    pieces = planning.plan_data(cfg)[0].pieces
    assert len(pieces) > 8

    encode = Tokenizer.encode_documents
    calls = []

    def encode_then_stop(self, texts):
        # The stop file appears while a piece is half done (this process's 12th encode; several
        # per piece, as the buffer holds 600 characters): Slurm's USR1 before the time limit.
        calls.append(len(texts))
        if len(calls) == 12:
            stop.touch()
        return encode(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_documents", encode_then_stop)
    with pytest.raises(SystemExit) as exit_:
        data.run(cfg)
    assert isinstance(exit_.value, preemption.Requeue) and exit_.value.code == preemption.EXIT_REQUEUE
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert not indexed.domain_manifest_path(run_dir, "x").exists()
    kept = _markers(run_dir, "x")
    assert 0 < len(kept) < len(pieces)
    fps = data.piece_fingerprints(cfg, planning.plan_data(cfg)[0], load_tokenizer(run_dir).sha256)
    for piece, fp in zip(pieces, fps):  # a piece is either complete or absent
        assert shards.piece_done(run_dir, piece, fp) == (f"{piece.id}.json" in kept)
        if f"{piece.id}.json" not in kept:
            assert not list((run_dir / "data" / "x" / "parts").glob(f"{piece.id}.*"))
    stamps = {n: t for n, t in _stamps(run_dir, "x").items() if n in kept}

    monkeypatch.setattr(Tokenizer, "encode_documents", encode)
    stop.unlink()
    data.run(cfg)  # the requeued job
    assert {n: t for n, t in _stamps(run_dir, "x").items() if n in kept} == stamps
    reference = tmp_path / "reference"
    data.run(user_config(reference, *extra, tokenizer_dir=tokenizer_dir))
    assert data_files(run_dir, "x") == data_files(reference, "x")


# ------------------------------------------------------------------------------ bad records


def test_bad_records_fail_in_one_line_or_are_counted(tmp_path):
    path = tmp_path / "in" / "mixed.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS[:60]]
    lines[2] = "not json at all"
    lines[10] = json.dumps(["an", "array"])
    lines[20] = json.dumps({"body": "no text field"})
    lines[40] = json.dumps({"text": None})
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    domains = f"[{{name: x, source: '{path}'}}]"
    run_dir = tmp_path / "run"
    with pytest.raises(BtxError) as err:
        data.run(user_config(run_dir, domains))
    assert str(err.value) == f"data.domains.0.source: {path}:3 is not valid JSON (Expecting value)"
    assert not list(run_dir.glob("data/*/manifest.json"))

    cfg = user_config(run_dir, domains, "data.skip_bad_records=true")
    manifest = data.run(cfg)["domains"]["x"]
    assert manifest["bad_records"]["counts"] == {"invalid_json": 1, "not_object": 1, "missing_field": 1, "null": 1}
    assert manifest["bad_records"]["first"][0] == f"{path}:3 is not valid JSON (Expecting value)"
    assert [f.split(" ")[0] for f in manifest["bad_records"]["first"]] == \
        [f"{path}:{n}" for n in (3, 11, 21)] + [f"{path}:41:"]
    good = [d for i, d in enumerate(DOCS[:60]) if i not in (2, 10, 20, 40)]
    expected = split(good, cfg, "x")
    tok = load_tokenizer(run_dir)
    for side in ("train", "valid"):
        assert dataset_texts(indexed.dataset_prefix(run_dir, "x", side), tok) == expected[side]


@pytest.mark.timeout(120, method="thread")  # a hang would not answer a signal
def test_a_config_error_in_a_worker_process_comes_back(tmp_path, tokenizer_dir):
    """A worker's ConfigError (a missing text field) reaches the stage with its key, instead of
    killing the pool's result thread (which used to hang the stage)."""
    path = write_jsonl(tmp_path / "in" / "rows.jsonl", DOCS[:60], key="body")
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        data.run(user_config(run_dir, f"[{{name: x, source: '{path}'}}]", "data.workers=2",
                             tokenizer_dir=tokenizer_dir))
    assert err.value.key == "data.domains.0.text_key" and "has no field 'text'" in str(err.value)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not list(run_dir.glob("data/*/manifest.json"))


# ------------------------------------------------------------------------------ bring your own


def test_existing_megatron_dataset_as_a_domain(tmp_path, tokenizer_dir):
    source = write_jsonl(tmp_path / "in" / "notes.jsonl", DOCS[:200])
    mine = tmp_path / "mine"
    data.run(user_config(mine, f"[{{name: notes, source: '{source}'}}]", "data.keep_parts=false",
                         tokenizer_dir=tokenizer_dir))
    assert not (mine / "data" / "notes" / "parts").exists()
    prefix, valid_prefix = mine / "data" / "notes" / "train", mine / "data" / "notes" / "valid"
    tok = load_tokenizer(mine)
    texts = dataset_texts(prefix, tok)

    # Valid documents carved out of one dataset by position.
    run_dir = tmp_path / "run"
    cfg = user_config(run_dir, f"[{{name: ext, prefix: '{prefix}'}}]", tokenizer_dir=tokenizer_dir)
    check_data(cfg)
    manifest = data.run(cfg)["domains"]["ext"]
    assert sorted(p.name for p in (run_dir / "data").rglob("*") if p.is_file()) == [".lock", "manifest.json"]
    assert manifest["external"]["prefix"] == str(prefix) and manifest["external"]["documents"] == len(texts)
    held = held_out_positions(len(texts), seed=cfg.data.seed, domain="ext", fraction=cfg.data.valid_fraction)
    assert 0 < held.sum() < len(texts)
    assert np.array_equal(indexed.document_subset(run_dir, "ext", "valid"), np.flatnonzero(held))
    assert np.array_equal(indexed.document_subset(run_dir, "ext", "train"), np.flatnonzero(~held))
    assert manifest["splits"]["valid"]["documents"] == held.sum()
    assert indexed.dataset_prefix(run_dir, "ext", "valid") == str(prefix)
    valid = [t for t, h in zip(texts, held) if h]
    train = [t for t, h in zip(texts, held) if not h]
    for batch in validation_batches(cfg, run_dir, "ext", 2):
        for row in batch:
            for piece in tok.decode(row.tolist()).split(BPE_EOD):
                if len(piece) > 40:
                    assert any(piece in d for d in valid) and not any(piece in d for d in train)
    batch = TrainData(cfg, run_dir, ["ext"]).global_batch(0)
    assert batch.shape == (cfg.train.global_batch_size, cfg.model.seq_length + 1)
    stamp = indexed.domain_manifest_path(run_dir, "ext").stat().st_mtime_ns
    data.run(cfg)
    assert indexed.domain_manifest_path(run_dir, "ext").stat().st_mtime_ns == stamp

    # Valid documents given as a second dataset: both read whole.
    both = tmp_path / "both"
    cfg2 = user_config(both, f"[{{name: ext, prefix: '{prefix}', valid_prefix: '{valid_prefix}'}}]",
                       tokenizer_dir=tokenizer_dir)
    m2 = data.run(cfg2)["domains"]["ext"]
    assert indexed.document_subset(both, "ext", "valid") is None
    assert indexed.dataset_prefix(both, "ext", "valid") == str(valid_prefix)
    assert m2["splits"]["train"]["documents"] == len(texts)
    assert m2["splits"]["valid"]["documents"] == len(dataset_texts(valid_prefix, tok))
    assert len(validation_batches(cfg2, both, "ext", 1)) == 1

    # A replaced file is noticed like a local one.
    with open(f"{valid_prefix}.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(BtxError, match="does not match its manifest"):
        indexed.dataset_prefix(both, "ext", "valid")


def test_existing_dataset_of_another_vocabulary_is_refused(tmp_path, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "big_vocab"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i in range(20):
        builder.add_document(np.array([5, 9, 700 + i, 3], dtype=np.uint16), [4])
    builder.finalize(f"{prefix}.idx")
    run_dir = tmp_path / "run"
    cfg = user_config(run_dir, f"[{{name: ext, prefix: '{prefix}'}}]", tokenizer_dir=tokenizer_dir)
    with pytest.raises(ConfigError) as err:
        data.run(cfg)
    assert err.value.key == "data.domains.0.prefix" and "token id 719" in str(err.value)
    assert "\n" not in str(err.value)
    assert not list(run_dir.glob("data/*/manifest.json"))


@pytest.mark.parametrize("given", ["prefix", "valid_prefix", "valid_prefix_alone"])
def test_missing_prefix_is_a_config_error(tmp_path, given):
    real = tmp_path / "real"
    for ext in ("bin", "idx"):
        Path(f"{real}.{ext}").write_bytes(b"")
    missing = tmp_path / "nope"
    domain = {"prefix": f"{{name: e, prefix: '{missing}'}}",
              "valid_prefix": f"{{name: e, prefix: '{real}', valid_prefix: '{missing}'}}",
              "valid_prefix_alone": f"{{name: e, valid_prefix: '{real}'}}"}[given]
    cfg = user_config(tmp_path / "run", f"[{domain}]")
    with pytest.raises(ConfigError) as err:
        check_data(cfg)
    assert err.value.key == f"data.domains.0.{given.replace('_alone', '')}"
    assert "\n" not in str(err.value)
