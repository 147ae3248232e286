"""One domain's pieces -> its train and valid datasets, with megatron-core's IndexedDatasetBuilder.

`merge_domain` concatenates the partial datasets (shards.py) in piece order with
`IndexedDatasetBuilder.add_index`, so the result is the same bytes whatever the number of
workers or units that produced them, then writes the domain's manifest last. The builder keeps
the document and sequence index of the whole domain as Python lists (about 70 bytes per
document: 3.5 GB for 50M documents), the one place where memory grows with the corpus; the
token data is copied file to file.

`register_external` is the merge of a domain given as an existing megatron dataset
(`data.domains.<i>.prefix`): nothing is copied; every token id is checked against the
vocabulary (read in blocks), the documents are counted, and the manifest records where the
splits are read from.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from nemo_btx.artifacts import make_tmp_dir, read_json, software_versions
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.data import indexed, shards
from nemo_btx.data.plan import DomainPlan, fingerprint_hash, settings
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.run_dir import RunDir

log = logging.getLogger(__name__)

#: Token ids read per block when an external dataset is checked against the vocabulary.
_CHECK_BLOCK = 1 << 24


def domain_fingerprint(cfg: ExperimentConfig, plan: DomainPlan, piece_fps: List[dict]) -> dict:
    """What a domain's datasets are made of: its pieces' fingerprints, in order."""
    if plan.external:
        return {"external": {"prefix": plan.prefix, "valid_prefix": plan.valid_prefix,
                             "files": [_stat(p) for p in _external_files(plan)]},
                **settings(cfg, plan.name)}
    return {"pieces": [fingerprint_hash(fp) for fp in piece_fps]}


def domain_done(run_dir, plan: DomainPlan, fp: dict) -> bool:
    manifest = indexed.read_domain_manifest(run_dir, plan.name)
    return (manifest is not None and manifest.get("fingerprint") == fp
            and indexed.domain_files_intact(run_dir, plan.name, manifest))


def merge_domain(cfg: ExperimentConfig, plan: DomainPlan, piece_fps: List[dict], tokenizer) -> dict:
    """Concatenate the domain's pieces into <run.dir>/data/<domain>/{train,valid} + manifest."""
    start = time.perf_counter()
    rd = RunDir.of(cfg)
    missing = [p.id for p, fp in zip(plan.pieces, piece_fps) if not shards.piece_done(rd.root, p, fp)]
    if missing:
        units = sorted({f"tokenize:{plan.name}:{k}" for k, (a, b) in enumerate(plan.units)
                        for p in plan.pieces[a:b] if p.id in missing})
        raise BtxError(f"data {plan.name}: {len(missing)} of {len(plan.pieces)} pieces are not tokenized "
                       f"(or their inputs changed): run {', '.join(units[:4])}{' ...' if len(units) > 4 else ''} first")
    markers = [read_json(shards.marker_path(rd.root, plan.name, p.id)) for p in plan.pieces]
    dtype = tokenizer.dataset_dtype
    out = rd.data_domain(plan.name)
    out.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp_dir(out, ".merge.tmp-")
    try:
        stats: Dict[str, dict] = {}
        for split in indexed.SPLITS:
            _concatenate([str(shards.part_prefix(rd.root, plan.name, p.id, split)) for p in plan.pieces],
                         str(tmp / split), dtype)
            stats[split] = {k: sum(m["splits"][split][k] for m in markers) for k in ("documents", "tokens", "chars")}
            stats[split].update(bin_bytes=(tmp / f"{split}.bin").stat().st_size,
                                idx_bytes=(tmp / f"{split}.idx").stat().st_size)
        _check_both_sides(cfg, plan, stats)
        bad: Dict[str, int] = {}
        first: List[str] = []
        for m in markers:
            for reason, n in m["bad_records"]["counts"].items():
                bad[reason] = bad.get(reason, 0) + n
            first += m["bad_records"]["first"][:max(0, 5 - len(first))]
        indexed.remove_domain_manifest(rd.root, plan.name)
        for split in indexed.SPLITS:
            for ext in ("bin", "idx"):
                os.replace(tmp / f"{split}.{ext}", out / f"{split}.{ext}")
        manifest = {
            "fingerprint": domain_fingerprint(cfg, plan, piece_fps), "source": plan.source.provenance,
            "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                          "eod_id": tokenizer.eod_id},
            "dtype": np.dtype(dtype).name, "splits": stats, "pieces": len(plan.pieces),
            "empty": sum(m["empty"] for m in markers), "duplicates": sum(m["duplicates"] for m in markers),
            "bad_records": {"counts": bad, "first": first}, "versions": data_versions(),
            "seconds": round(time.perf_counter() - start, 3)}
        indexed.write_domain_manifest(rd.root, plan.name, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not cfg.data.keep_parts:
        shutil.rmtree(rd.data_parts(plan.name), ignore_errors=True)
    tr, va = stats["train"], stats["valid"]
    log.info("data %s: train %d documents / %d tokens, valid %d documents / %d tokens (%d pieces, %.1f s)",
             plan.name, tr["documents"], tr["tokens"], va["documents"], va["tokens"], len(plan.pieces),
             time.perf_counter() - start)
    return manifest


def _concatenate(parts: List[str], out: str, dtype) -> None:
    """`IndexedDatasetBuilder.add_index` of every part, in order, into `out`.{bin,idx}.

    add_index runs gc.collect() after each part, which walks every object the process holds
    (torch's and megatron's: 0.1-0.4 s a call, hours over a domain of thousands of pieces).
    Freezing what exists before the merge leaves those collections only the merge's objects."""
    import gc

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    gc.freeze()
    try:
        builder = IndexedDatasetBuilder(f"{out}.bin", dtype=dtype)
        for part in parts:
            builder.add_index(part)
        builder.finalize(f"{out}.idx")
    finally:
        gc.unfreeze()


def data_versions() -> dict:
    """`software_versions` and the packages that decide a dataset's bytes (the BPE, the builtin
    wiki text, the arrays)."""
    from importlib import metadata

    out = software_versions()
    for pkg in ("tokenizers", "gensim", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _check_both_sides(cfg: ExperimentConfig, plan: DomainPlan, stats: Dict[str, dict]) -> None:
    """A domain needs documents to train on and held-out documents to be scored on."""
    for split in indexed.SPLITS:
        if stats[split]["documents"] == 0:
            n = stats["train"]["documents"] + stats["valid"]["documents"]
            raise ConfigError("data.valid_fraction", cfg.data.valid_fraction,
                              f"domain '{plan.name}' ended with no {split} document (of {n}); the split is "
                              "decided per document by a hash, so a domain needs enough documents "
                              "for both sides at this fraction")


# ------------------------------------------------------------------------------ external

def _external_files(plan: DomainPlan) -> List[Path]:
    prefixes = [plan.prefix] + ([plan.valid_prefix] if plan.valid_prefix else [])
    return [Path(f"{p}.{ext}") for p in prefixes for ext in ("bin", "idx")]


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_external_files(plan: DomainPlan) -> None:
    """The .bin and .idx of every given prefix exist (a one-line error naming the key)."""
    for key, prefix in ((f"data.domains.{plan.source.index}.prefix", plan.prefix),
                        (f"data.domains.{plan.source.index}.valid_prefix", plan.valid_prefix)):
        if prefix is None:
            continue
        for ext in ("bin", "idx"):
            if not Path(f"{prefix}.{ext}").is_file():
                raise ConfigError(key, prefix, f"no {prefix}.{ext}: give the path prefix of a megatron "
                                  "indexed dataset (the .bin/.idx pair without the extension)")


def register_external(cfg: ExperimentConfig, plan: DomainPlan, tokenizer) -> dict:
    """Check an existing megatron dataset against the run's tokenizer and record it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    start = time.perf_counter()
    check_external_files(plan)
    rd = RunDir.of(cfg)
    key = f"data.domains.{plan.source.index}"
    datasets = {"train": IndexedDataset(plan.prefix)}
    if plan.valid_prefix:
        datasets["valid"] = IndexedDataset(plan.valid_prefix)
    for name, ds in datasets.items():
        prefix = plan.prefix if name == "train" else plan.valid_prefix
        top = _max_token(prefix, ds)
        if top >= tokenizer.vocab_size:
            raise ConfigError(f"{key}.{'prefix' if name == 'train' else 'valid_prefix'}", prefix,
                              f"holds token id {top}, but the run's tokenizer has {tokenizer.vocab_size} "
                              "ids: it was tokenized with another tokenizer")
    n = len(datasets["train"].document_indices) - 1
    d = cfg.data
    stats = {}
    if plan.valid_prefix:
        for split, ds in datasets.items():
            stats[split] = {"documents": len(ds.document_indices) - 1, "tokens": int(ds.sequence_lengths.sum())}
    else:
        lengths = _document_lengths(datasets["train"])
        for split in indexed.SPLITS:
            docs = indexed.carve(n, split, seed=d.seed, domain=plan.name, fraction=d.valid_fraction)
            stats[split] = {"documents": int(len(docs)), "tokens": int(lengths[docs].sum())}
    _check_both_sides(cfg, plan, stats)
    manifest = {
        "fingerprint": domain_fingerprint(cfg, plan, []), "source": plan.source.provenance,
        "external": {"prefix": plan.prefix, "valid_prefix": plan.valid_prefix, "documents": n,
                     "split": {"seed": d.seed, "valid_fraction": d.valid_fraction}},
        "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id},
        "dtype": np.dtype(datasets["train"].index.dtype).name, "splits": stats,
        "versions": data_versions(), "seconds": round(time.perf_counter() - start, 3)}
    for split in indexed.SPLITS:  # sizes, so that a replaced file is noticed like a local one
        prefix = indexed.split_prefix(rd.root, plan.name, split, manifest)
        stats[split].update(bin_bytes=Path(f"{prefix}.bin").stat().st_size,
                            idx_bytes=Path(f"{prefix}.idx").stat().st_size)
    rd.data_domain(plan.name).mkdir(parents=True, exist_ok=True)
    indexed.write_domain_manifest(rd.root, plan.name, manifest)
    log.info("data %s: %s: train %d documents / %d tokens, valid %d documents / %d tokens (checked, read "
             "in place)", plan.name, plan.prefix, stats["train"]["documents"], stats["train"]["tokens"],
             stats["valid"]["documents"], stats["valid"]["tokens"])
    return manifest


def _document_lengths(ds) -> np.ndarray:
    """Tokens per document (one sequence per document in text datasets; summed otherwise)."""
    seq = np.asarray(ds.sequence_lengths, dtype=np.int64)
    bounds = np.asarray(ds.document_indices, dtype=np.int64)
    csum = np.concatenate([[0], np.cumsum(seq)])
    return csum[bounds[1:]] - csum[bounds[:-1]]


def _max_token(prefix: str, ds) -> int:
    """The largest token id in a .bin, read in blocks (bounded memory)."""
    data = np.memmap(f"{prefix}.bin", dtype=ds.index.dtype, mode="r")
    top = -1
    for start in range(0, len(data), _CHECK_BLOCK):
        block = data[start:start + _CHECK_BLOCK]
        if len(block):
            top = max(top, int(block.max()))
    del data
    return top
