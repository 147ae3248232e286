"""Global batches are a pure function of (seed, step), follow the weights, and build safely in parallel."""

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import clean_env, run_torchrun
from nemo_btx.data import indexed
from nemo_btx.data.loader import TrainData, validation_batches
from nemo_btx.data.tokenizer import BPE_EOD, load_tokenizer
from nemo_btx.errors import BtxError
from nemo_btx.stages import data

from data_fixtures import built_run, expected_splits, small_config, split  # noqa: F401 - built_run is a fixture

DOMAINS = ["code", "math", "wiki"]
WORKER = Path(__file__).with_name("loader_worker.py")


def _digest(td: TrainData, steps) -> str:
    h = hashlib.sha256()
    for s in steps:
        h.update(td.global_batch(s).numpy().tobytes())
    return h.hexdigest()


def test_global_batch_is_a_pure_function_of_seed_and_step(built_run):
    cfg, run_dir, manifest = built_run
    a, b = TrainData(cfg, run_dir, DOMAINS), TrainData(cfg, run_dir, DOMAINS)
    batch = a.global_batch(3)
    assert batch.shape == (cfg.train.global_batch_size, cfg.model.seq_length + 1)
    assert batch.dtype == torch.long
    assert 0 <= int(batch.min()) and int(batch.max()) < manifest["tokenizer"]["vocab_size"]
    assert torch.equal(batch, b.global_batch(3))
    assert not torch.equal(batch, a.global_batch(4))
    # Resuming at step k reads what an uninterrupted run reads: no hidden iterator state.
    assert _digest(a, range(10)) == _digest(TrainData(cfg, run_dir, DOMAINS), range(10))
    other_seed = small_config(run_dir, "train.seed=4321")
    assert not torch.equal(batch, TrainData(other_seed, run_dir, DOMAINS).global_batch(3))
    with pytest.raises(BtxError, match="past the data"):
        a.global_batch(cfg.train.train_iters + 10_000)


def _split_docs(cfg, name):
    splits = expected_splits(cfg, name)
    return splits["train"], splits["valid"]


def test_rows_are_contiguous_training_text(built_run):
    """A row is the tail of one training document, whole documents, and the head of another."""
    cfg, run_dir, _ = built_run
    tok = load_tokenizer(run_dir)
    train, _ = _split_docs(cfg, "math")
    whole = set(train)
    for row in TrainData(cfg, run_dir, ["math"]).global_batch(0):
        pieces = tok.decode(row.tolist()).split(BPE_EOD)
        if len(pieces) == 1:  # inside one document
            assert any(pieces[0] in d for d in train)
            continue
        assert all(p in whole for p in pieces[1:-1])
        assert any(d.endswith(pieces[0]) for d in train) and any(d.startswith(pieces[-1]) for d in train)


def test_mixture_follows_the_weights(built_run):
    cfg, run_dir, _ = built_run
    weights = [0.6, 0.3, 0.1]
    td = TrainData(cfg, run_dir, DOMAINS, weights)
    counts = Counter()
    for step in range(cfg.train.train_iters):
        counts.update(td.batch_domains(step).tolist())
    total = sum(counts.values())
    assert total == cfg.train.train_iters * cfg.train.global_batch_size
    for i, w in enumerate(weights):
        assert abs(counts[i] / total - w) < 0.01, (counts, weights)
    # A zero weight leaves a domain out; weights default to data.domains.<i>.weight (equal).
    only = TrainData(cfg, run_dir, DOMAINS, [0, 1, 0])
    assert set(only.batch_domains(5).tolist()) == {1}
    equal = TrainData(cfg, run_dir, DOMAINS)
    assert equal.weights == pytest.approx([1 / 3] * 3)


def test_validation_batches_are_fixed_and_held_out(built_run):
    cfg, run_dir, _ = built_run
    tok = load_tokenizer(run_dir)
    first = validation_batches(cfg, run_dir, "wiki", 3)
    again = validation_batches(small_config(run_dir, "train.seed=999"), run_dir, "wiki", 3)
    assert len(first) == 3 and all(b.shape == (8, cfg.model.seq_length + 1) for b in first)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    train, valid = _split_docs(cfg, "wiki")
    for batch in first:
        for row in batch:
            for piece in tok.decode(row.tolist()).split(BPE_EOD):
                if len(piece) > 30:
                    assert any(piece in doc for doc in valid)
                    assert not any(piece in doc for doc in train)


def test_user_domains_end_to_end(tmp_path):
    jsonl = tmp_path / "notes.jsonl"
    notes = [f"Note {i}: the value of item {i} is {i * 7}. " * 5 for i in range(40)]
    jsonl.write_text("\n".join(json.dumps({"text": n}) for n in notes))
    texts = tmp_path / "letters"
    texts.mkdir()
    letters = [f"Dear reader number {i},\nthis is letter {i}.\n" * 8 for i in range(12)]
    for i, letter in enumerate(letters):
        (texts / f"{i:02d}.txt").write_text(letter)
    run_dir = tmp_path / "run"
    cfg = small_config(run_dir, f"data.domains=[{{name: notes, source: '{jsonl}', weight: 3}},"
                                f"{{name: letters, source: '{texts}/*.txt'}}]", "data.valid_fraction=0.25")
    manifest = data.run(cfg)
    for name, docs in (("notes", notes), ("letters", letters)):
        for side, held in split(docs, cfg, name).items():
            assert manifest["domains"][name]["splits"][side]["documents"] == len(held) > 0
    assert len(manifest["domains"]["notes"]["source"]["files"]) == 1
    td = TrainData(cfg, run_dir, ["notes", "letters"])
    assert td.weights == pytest.approx([0.75, 0.25])
    tok = load_tokenizer(run_dir)
    text = tok.decode(td.global_batch(0).flatten().tolist())
    assert "Note" in text or "letter" in text
    assert len(validation_batches(cfg, run_dir, "letters", 2)) == 2


def _worker_digest(cfg, run_dir) -> str:
    """What tests/data/loader_worker.py computes, in this process."""
    td = TrainData(cfg, run_dir, DOMAINS, [0.5, 0.25, 0.25])
    h = hashlib.sha256()
    for step in (0, 7, cfg.train.train_iters - 1):
        h.update(td.global_batch(step).numpy().tobytes())
    for batch in validation_batches(cfg, run_dir, "wiki", 2):
        h.update(batch.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.distributed
@pytest.mark.slow
def test_processes_racing_to_build_the_caches_agree(built_run, tmp_path):
    """Two plain processes and a 2-rank torchrun job build the same fresh caches at once.

    Plain processes serialise on the file lock; under torchrun rank 0 builds and rank 1 waits
    for the renamed directory. Everyone must read the batches this process reads.
    """
    cfg, run_dir, _ = built_run
    seeds = ["train.seed=77", "data.seed=77"]
    plain = [subprocess.Popen([sys.executable, str(WORKER), str(run_dir), str(tmp_path / "plain"), *seeds],
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        run_torchrun(WORKER, [run_dir, tmp_path / "dist", *seeds], nproc=2, timeout=120)
    finally:
        errors = [p.communicate(timeout=120)[1] for p in plain]
    for p, err in zip(plain, errors):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("plain.*"))]
    ranks = [json.loads((tmp_path / f"dist.{r}").read_text()) for r in (0, 1)]
    assert len(results) == 2 and not any(r["dist"] for r in results) and all(r["dist"] for r in ranks)
    expected = _worker_digest(small_config(run_dir, *seeds), run_dir)
    assert {r["digest"] for r in results + ranks} == {expected}
    assert not list((indexed.data_dir(run_dir) / "cache").glob(".*tmp*"))
