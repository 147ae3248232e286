"""Tokenize pieces (nemo_btx/data/plan.py) into partial megatron datasets, with worker processes.

One piece -> `<run.dir>/data/<domain>/parts/<id>.{train,valid}.{bin,idx}` and, written last,
`<id>.json`: the piece's fingerprint (inputs, tokenizer, split, settings) and its counts. A
piece whose marker matches the current fingerprint and whose files have the recorded sizes is
done; anything else is (re)tokenized. Each piece is written under a temporary directory and
moved into place before its marker, so a killed worker leaves nothing that looks complete.

Memory of a worker is bounded by the piece (its index lists and, with `data.dedup=chunk`,
16 bytes per document) and `data.buffer_size` (text waiting for one batched encode), never by
the corpus. Documents flow: read (readers.py / the builtin streams) -> skip empty -> dedup ->
split by hash (documents.py) -> buffer -> `Tokenizer.encode_documents` -> train or valid builder.
Worker processes each take whole pieces; pieces are independent, so the merge (merge.py) gives
the same bytes whatever `data.workers` was.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

from nemo_btx import progress
from nemo_btx.artifacts import make_tmp_dir, read_json, write_json_atomic
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.data import corpora, documents, readers
from nemo_btx.data.plan import DomainPlan, Piece, sizes
from nemo_btx.data.tokenizer import Tokenizer
from nemo_btx.run_dir import RunDir
from nemo_btx.runtime import preemption

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")


class Abandoned(Exception):
    """A stop request arrived while a piece was being tokenized; nothing of it was kept."""


def part_prefix(run_dir, domain: str, piece_id: str, split: str) -> Path:
    return RunDir(run_dir).data_parts(domain) / f"{piece_id}.{split}"


def marker_path(run_dir, domain: str, piece_id: str) -> Path:
    return RunDir(run_dir).data_parts(domain) / f"{piece_id}.json"


def piece_done(run_dir, piece: Piece, fp: dict) -> bool:
    """The piece's marker exists, is of this fingerprint, and its files have the recorded sizes."""
    path = marker_path(run_dir, piece.domain, piece.id)
    try:
        marker = read_json(path)
    except (OSError, ValueError):
        return False
    if marker.get("fingerprint") != fp:
        return False
    for split in SPLITS:
        for ext in ("bin", "idx"):
            f = Path(f"{part_prefix(run_dir, piece.domain, piece.id, split)}.{ext}")
            if not f.is_file() or f.stat().st_size != marker["splits"][split][f"{ext}_bytes"]:
                return False
    return True


def _documents(cfg: ExperimentConfig, plan: DomainPlan, piece: Piece, bad: readers.BadRecords) -> Iterator[str]:
    src = plan.source
    if piece.chunk is None:  # the whole (capped) stream, in order
        return corpora.iter_stream(src, cfg.data, skip_bad=cfg.data.skip_bad_records, bad=bad)
    return readers.read_chunk(piece.chunk, text_key=src.text_key, skip_bad=cfg.data.skip_bad_records,
                              bad=bad, where_key=f"data.domains.{src.index}")


@dataclass
class _Split:
    builder: object
    documents: int = 0
    tokens: int = 0
    chars: int = 0


@dataclass
class PieceResult:
    domain: str
    piece: str
    splits: Dict[str, dict] = field(default_factory=dict)
    empty: int = 0
    duplicates: int = 0
    bad: Optional[readers.BadRecords] = None
    nbytes: int = 0
    seconds: float = 0.0

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.splits.values())

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.splits.values())


def tokenize_piece(cfg: ExperimentConfig, plan: DomainPlan, piece: Piece, tokenizer: Tokenizer,
                   fp: dict) -> PieceResult:
    """Write one piece's partial train/valid datasets and, last, its marker."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.perf_counter()
    rd = RunDir(cfg.run.dir)
    parts = rd.data_parts(plan.name)
    parts.mkdir(parents=True, exist_ok=True)
    marker_path(rd.root, plan.name, piece.id).unlink(missing_ok=True)  # withdraw an old claim
    _, _, buffer_bytes = sizes(cfg)
    dtype = tokenizer.dataset_dtype
    tmp = make_tmp_dir(parts, f".{piece.id}.tmp-")
    bad = readers.BadRecords()
    dedup = documents.Dedup(cfg.data.dedup == "chunk")
    d = cfg.data
    out = {s: _Split(IndexedDatasetBuilder(str(tmp / f"{s}.bin"), dtype=dtype)) for s in SPLITS}
    empty = 0
    buffered: List[str] = []
    sides: List[str] = []
    size = 0

    def flush() -> None:
        nonlocal size
        for text, side, ids in zip(buffered, sides, tokenizer.encode_documents(buffered)):
            split = out[side]
            split.builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            split.documents += 1
            split.tokens += len(ids)
            split.chars += len(text)
        buffered.clear()
        sides.clear()
        size = 0
        if preemption.requested_locally():
            raise Abandoned()

    moved = None
    if piece.chunk is None:
        # The whole (small) domain in one stream: a first pass over the split values finds the
        # one document to move if a side would be empty (documents.one_each_side).
        first_pass = documents.Dedup(cfg.data.dedup == "chunk")
        values = [documents.split_value(t, seed=d.seed, domain=plan.name)
                  for t in _documents(cfg, plan, piece, readers.BadRecords())
                  if t.strip() and first_pass.is_new(t)]
        moved = documents.one_each_side(values, d.valid_fraction)
    position = -1
    try:
        for text in _documents(cfg, plan, piece, bad):
            if not text.strip():
                empty += 1
                continue
            if not dedup.is_new(text):
                continue
            position += 1
            held = documents.held_out(text, seed=d.seed, domain=plan.name, fraction=d.valid_fraction)
            if position == moved:
                held = not held
            buffered.append(text)
            sides.append("valid" if held else "train")
            size += len(text)
            if size >= buffer_bytes:
                flush()
        flush()
        stats = {}
        for s, split in out.items():
            split.builder.finalize(str(tmp / f"{s}.idx"))
            stats[s] = {"documents": split.documents, "tokens": split.tokens, "chars": split.chars,
                        "bin_bytes": (tmp / f"{s}.bin").stat().st_size,
                        "idx_bytes": (tmp / f"{s}.idx").stat().st_size}
        for s in SPLITS:
            for ext in ("bin", "idx"):
                os.replace(tmp / f"{s}.{ext}", f"{part_prefix(rd.root, plan.name, piece.id, s)}.{ext}")
        result = PieceResult(plan.name, piece.id, stats, empty, dedup.dropped, bad, piece.nbytes,
                             time.perf_counter() - start)
        write_json_atomic(marker_path(rd.root, plan.name, piece.id), {
            "fingerprint": fp, "splits": stats, "empty": empty, "duplicates": dedup.dropped,
            "bad_records": {"counts": bad.counts, "first": bad.locations}, "dtype": np.dtype(dtype).name,
            "input": piece.describe(), "seconds": round(result.seconds, 3)})
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ workers

_WORKER: dict = {}


def _init_worker(cfg: ExperimentConfig, plans: Dict[str, DomainPlan]) -> None:
    from nemo_btx.data.tokenizer import load_tokenizer

    # One worker = one core: the Rust tokenizer's own threads would compete with the others.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # USR1 only: Pool.terminate() stops a worker with TERM, which must still end it (a forked
    # worker inherits the parent's handlers, where TERM is a stop request: reset it).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    preemption.install((signal.SIGUSR1,))
    _WORKER.update(cfg=cfg, plans=plans, tokenizer=load_tokenizer(RunDir.of(cfg).root))


def _work(job) -> PieceResult:
    domain, index, fp = job
    plan = _WORKER["plans"][domain]
    return tokenize_piece(_WORKER["cfg"], plan, plan.pieces[index], _WORKER["tokenizer"], fp)


def worker_count(cfg: ExperimentConfig, jobs: int) -> int:
    cpus = cfg.data.workers or len(os.sched_getaffinity(0))
    return max(1, min(cpus, jobs))


def tokenize_pieces(cfg: ExperimentConfig, plans: List[DomainPlan], todo: List[Piece],
                    fingerprints: Dict[tuple, dict], label: str) -> List[PieceResult]:
    """Tokenize `todo` with `data.workers` processes; progress in the log (documents/s,
    tokens/s, ETA), on a terminal as a bar, and for `nemo-btx run` in its progress file.

    A stop request (Slurm's USR1 -> the stop file) abandons the pieces in flight (their partial
    files are removed; finished pieces keep their markers) and exits with 75 to be requeued."""
    if not todo:
        return []
    by_name = {p.name: p for p in plans}
    jobs = [(p.domain, p.index, fingerprints[(p.domain, p.index)]) for p in todo]
    total_bytes = sum(p.nbytes for p in todo) or 1
    workers = worker_count(cfg, len(jobs))
    log.info("data %s: %d chunk(s), %.1f MB of input, %d worker(s)", label, len(jobs),
             total_bytes / 1e6, workers)
    reporter = progress.Reporter("MB of input", max(1, round(total_bytes / 1e6)))
    bar = _bar(total_bytes) if sys.stderr.isatty() and os.environ.get("RANK", "0") == "0" else None
    results: List[PieceResult] = []
    start, last_log, done_bytes = time.perf_counter(), 0.0, 0

    def account(res: PieceResult) -> None:
        nonlocal last_log, done_bytes
        results.append(res)
        done_bytes += res.nbytes
        took = time.perf_counter() - start
        rate = done_bytes / max(took, 1e-9)
        eta = (total_bytes - done_bytes) / rate if rate else None
        reporter.update(round(done_bytes / 1e6), eta_s=eta)
        if bar is not None:
            bar.update(res.nbytes)
        docs = sum(r.documents for r in results)
        tokens = sum(r.tokens for r in results)
        if bar is None and (time.perf_counter() - last_log > 10 or len(results) == len(jobs)):
            last_log = time.perf_counter()
            log.info("data %s: %d/%d chunks, %d documents (%.0f/s), %d tokens (%.0f/s), eta %.0f s",
                     label, len(results), len(jobs), docs, docs / took, tokens, tokens / took, eta or 0)

    try:
        if workers == 1:
            _init_worker(cfg, by_name)
            for job in jobs:
                if preemption.requested_locally():
                    raise Abandoned()
                account(_work(job))
        else:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg, by_name)) as pool:
                try:
                    for res in pool.imap_unordered(_work, jobs):
                        account(res)
                        if preemption.requested_locally() and len(results) < len(jobs):
                            raise Abandoned()
                except BaseException:
                    pool.terminate()  # workers die mid-piece: their temporary directories go below
                    raise
    except Abandoned:
        _remove_temporaries(cfg, {p.domain for p in todo})
        log.info("data %s: stop requested: %d of %d chunks kept; exiting with %d to be requeued",
                 label, len(results), len(jobs), preemption.EXIT_REQUEUE)
        raise preemption.Requeue() from None
    finally:
        if bar is not None:
            bar.close()
    return results


def _remove_temporaries(cfg: ExperimentConfig, domains) -> None:
    rd = RunDir.of(cfg)
    for d in domains:
        for tmp in rd.data_parts(d).glob(".*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _bar(total_bytes: int):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, dynamic_ncols=True)
