"""`nemo-btx data`: the run's tokenizer and one indexed dataset per domain, with a manifest.

The stage is skipped when `<run.dir>/data/manifest.json` exists, every domain directory matches
its entry, and the manifest's fingerprint equals the one the current config gives (domains,
sources down to file sizes and the Python/gensim/generator versions behind the builtins, caps,
split, seed, tokenizer settings). Otherwise everything is rebuilt, in an order that keeps bad
input from writing anything and a crash from leaving anything that looks complete:

1. resolve and check every domain's source (a bad path fails here, naming its key);
2. read all documents, split them, train or load the tokenizer and check it fits the model
   (still nothing written);
3. withdraw the old manifest, then write the tokenizer, each domain (temporary directory +
   rename), and the new manifest last.

The data stage is one process's work. Launched under torchrun, ranks other than 0 wait for rank
0's manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

from nemo_btx.artifacts import software_versions
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.data import corpora, indexed
from nemo_btx.data.tokenizer import check_vocab, make_tokenizer, save_tokenizer, tokenizer_dir
from nemo_btx.errors import BtxError

log = logging.getLogger(__name__)

#: How long ranks other than 0 wait for rank 0's manifest.
WAIT_SECONDS = 3600.0


def fingerprint(cfg: ExperimentConfig, sources: List[corpora.DomainSource]) -> dict:
    """Everything that decides the bytes the stage writes; equal fingerprints mean skip."""
    d, t = cfg.data, cfg.data.tokenizer
    tok: Dict[str, object] = {"kind": t.kind, "eod_token": t.eod_token}
    if t.kind == "hf":
        from nemo_btx.data.tokenizer import hf_tokenizer_file

        path = hf_tokenizer_file(t.path)
        tok.update(path=str(path.resolve()), sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    else:
        tok["vocab_size"] = cfg.model.vocab_size
    return {
        "domains": [{"name": s.name, "source": s.provenance, "max_documents": s.max_documents}
                    for s in sources],
        "tokenizer": tok,
        "valid_fraction": d.valid_fraction,
        "max_chars_per_domain": d.max_chars_per_domain,
        "seed": d.seed,
    }


def is_current(run_dir: Path, manifest: Optional[dict], fp: dict) -> bool:
    """Whether the manifest is complete, intact on disk and built from this fingerprint."""
    if manifest is None or manifest.get("fingerprint") != fp:
        return False
    if not (tokenizer_dir(run_dir) / "tokenizer.json").is_file():
        return False
    from nemo_btx.data.tokenizer import load_tokenizer

    if load_tokenizer(run_dir).sha256 != manifest["tokenizer"]["sha256"]:
        return False
    return all(indexed.domain_files_intact(run_dir, name, entry)
               for name, entry in manifest["domains"].items())


def _wait_for_rank0(run_dir: Path, fp: dict) -> dict:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        manifest = indexed.read_manifest(run_dir)
        if manifest is not None and manifest.get("fingerprint") == fp:
            return manifest
        time.sleep(1.0)
    raise BtxError(f"rank 0 did not write {indexed.manifest_path(run_dir)} within {WAIT_SECONDS:.0f} s")


def run(cfg: ExperimentConfig) -> dict:
    """Build (or confirm) the tokenizer and the per-domain datasets; return the data manifest."""
    run_dir = Path(cfg.run.dir)
    sources = corpora.resolve_sources(cfg.data)
    fp = fingerprint(cfg, sources)
    if int(os.environ.get("RANK", "0")) != 0:
        return _wait_for_rank0(run_dir, fp)
    manifest = indexed.read_manifest(run_dir)
    if is_current(run_dir, manifest, fp):
        _check_model_vocab(cfg, manifest)
        log.info("data: %s is complete and matches the config; skipping", indexed.manifest_path(run_dir))
        return manifest
    return build(cfg, run_dir, sources, fp)


def _check_model_vocab(cfg: ExperimentConfig, manifest: dict) -> None:
    """A skipped stage still fails when model.vocab_size no longer fits the existing tokenizer."""
    check_vocab(SimpleNamespace(vocab_size=manifest["tokenizer"]["vocab_size"]), cfg.model)  # type: ignore[arg-type]


def build(cfg: ExperimentConfig, run_dir: Path, sources: List[corpora.DomainSource], fp: dict) -> dict:
    """Read, split and tokenize every domain, then write tokenizer, datasets and manifest (last)."""
    start = time.perf_counter()
    splits = {}
    for src in sources:
        t0 = time.perf_counter()
        docs = corpora.read_documents(src, cfg.data)
        splits[src.name] = indexed.split_documents(docs, cfg.data.valid_fraction, cfg.data.seed, src.name)
        log.info("data: read %s: %d documents, %d characters (%.1f s)", src.name, len(docs),
                 sum(map(len, docs)), time.perf_counter() - t0)
    t0 = time.perf_counter()
    train_texts = [doc for train, _ in splits.values() for doc in train]
    tokenizer = make_tokenizer(cfg, train_texts, length=len(train_texts))
    log.info("data: tokenizer %s with %d tokens (%.1f s)", cfg.data.tokenizer.kind,
             tokenizer.vocab_size, time.perf_counter() - t0)

    # Everything is checked: from here on the run directory changes.
    with indexed.file_lock(indexed.data_dir(run_dir) / ".lock"):
        manifest = indexed.read_manifest(run_dir)
        if is_current(run_dir, manifest, fp):  # another process finished it meanwhile
            return manifest
        indexed.remove_manifest(run_dir)
        root = indexed.data_dir(run_dir)
        # Index caches belong to the old datasets; temporary directories to crashed writers
        # (no writer is active: they all hold this lock).
        for stale in [root / "cache", *root.glob(".*.tmp.*"), *run_dir.glob(".tokenizer.*")]:
            shutil.rmtree(stale, ignore_errors=True)
        save_tokenizer(tokenizer, run_dir)
        domains = {}
        for src in sources:
            t0 = time.perf_counter()
            train, valid = splits[src.name]
            entry = indexed.write_domain(run_dir, src.name, {"train": train, "valid": valid}, tokenizer)
            entry["source"] = src.provenance
            domains[src.name] = entry
            tr, va = entry["splits"]["train"], entry["splits"]["valid"]
            log.info("data: %s: train %d documents / %d tokens, valid %d documents / %d tokens (%.1f s)",
                     src.name, tr["documents"], tr["tokens"], va["documents"], va["tokens"],
                     time.perf_counter() - t0)
        manifest = {
            "fingerprint": fp,
            "tokenizer": {"kind": tokenizer.kind, "sha256": tokenizer.sha256,
                          "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                          "eod_token": tokenizer.eod_token},
            "domains": domains,
            "versions": _versions(),
            "seconds": round(time.perf_counter() - start, 3),
        }
        indexed.write_manifest(run_dir, manifest)
    log.info("data: wrote %s in %.1f s", indexed.manifest_path(run_dir), time.perf_counter() - start)
    return indexed.read_manifest(run_dir)


def _versions() -> dict:
    from importlib import metadata

    out = software_versions()
    for pkg in ("tokenizers", "gensim", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
