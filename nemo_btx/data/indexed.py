"""Per-domain megatron-core indexed datasets (`.bin/.idx`) and the manifest that vouches for them.

Layout under ``<run.dir>/data/``::

    manifest.json               written last: the only proof that the directories are complete
    <domain>/train.bin, .idx    one megatron "document" per source document, ids + end-of-document
    <domain>/valid.bin, .idx    held-out documents of the same domain (never in train)
    cache/                      GPTDataset/BlendedDataset index caches (see loader.py)

Each domain directory is written under a temporary name and renamed into place when both splits
are finished, and the manifest is replaced last, so a crash (or `kill -9`) leaves either the old
complete state or directories that no manifest names. A domain directory without its manifest
entry, or whose file sizes differ from the entry, is incomplete and `dataset_prefix` refuses it.

The split is by document, not by token: a validation document is never seen in training, even in
part. It is a pure function of (number of documents, `data.valid_fraction`, `data.seed`, domain).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from nemo_btx.artifacts import make_tmp_dir, read_json, write_json_atomic
from nemo_btx.data.tokenizer import Tokenizer
from nemo_btx.errors import BtxError
from nemo_btx.run_dir import RunDir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")
_ENCODE_CHUNK = 256


def data_dir(run_dir) -> Path:
    return RunDir(run_dir).data


def manifest_path(run_dir) -> Path:
    return data_dir(run_dir) / MANIFEST


def split_documents(docs: Sequence[str], valid_fraction: float, seed: int,
                    domain: str) -> Tuple[List[str], List[str]]:
    """(train, valid) documents: round(n * valid_fraction) held out, at least one, at most n-1.

    Which documents are held out is drawn with a generator seeded by (seed, domain), so it does
    not change with the other domains or with `train.seed`; both lists keep the source order.
    """
    n = len(docs)
    if n < 2:
        raise BtxError(f"domain '{domain}' has {n} document(s); at least 2 are needed to split")
    n_valid = min(n - 1, max(1, round(n * valid_fraction)))
    valid = set(random.Random(f"nemo-btx-split-{seed}-{domain}").sample(range(n), n_valid))
    train_docs = [d for i, d in enumerate(docs) if i not in valid]
    valid_docs = [d for i, d in enumerate(docs) if i in valid]
    return train_docs, valid_docs


def token_dtype(vocab_size: int):
    """The .bin dtype megatron-core picks for this vocabulary (uint16 below 65,500 ids)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _write_split(prefix: Path, docs: Sequence[str], tokenizer: Tokenizer, dtype) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    tokens = 0
    try:
        for start in range(0, len(docs), _ENCODE_CHUNK):
            for ids in tokenizer.encode_batch(list(docs[start:start + _ENCODE_CHUNK])):
                ids.append(tokenizer.eod_id)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                tokens += len(ids)
    finally:
        builder.finalize(str(prefix) + ".idx")
    return {"documents": len(docs), "tokens": tokens, "chars": sum(len(d) for d in docs),
            "bin_bytes": os.path.getsize(str(prefix) + ".bin"),
            "idx_bytes": os.path.getsize(str(prefix) + ".idx")}


def write_domain(run_dir, name: str, splits: Dict[str, Sequence[str]], tokenizer: Tokenizer) -> dict:
    """Tokenize and write `<run_dir>/data/<name>/{train,valid}.{bin,idx}`; return per-split stats.

    Written under a temporary directory beside the final one and renamed into place at the end.
    """
    root = data_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = make_tmp_dir(root, f".{name}.tmp.")
    try:
        stats = {split: _write_split(tmp / split, splits[split], tokenizer, dtype) for split in SPLITS}
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dtype": np.dtype(dtype).name, "splits": stats}


def read_manifest(run_dir) -> Optional[dict]:
    """The data manifest, or None when there is none (the data stage has not completed)."""
    path = manifest_path(run_dir)
    if not path.is_file():
        return None
    manifest = read_json(path)
    if manifest.get("format") != FORMAT_VERSION:
        return None
    return manifest


def write_manifest(run_dir, manifest: dict) -> None:
    write_json_atomic(manifest_path(run_dir), {"format": FORMAT_VERSION, **manifest})


def remove_manifest(run_dir) -> None:
    """Withdraw the proof of completeness before any file it vouches for is touched."""
    manifest_path(run_dir).unlink(missing_ok=True)


def domain_files_intact(run_dir, name: str, entry: dict) -> bool:
    """Whether `<run_dir>/data/<name>/` holds exactly the files its manifest entry describes."""
    for split, stats in entry["splits"].items():
        prefix = data_dir(run_dir) / name / split
        for ext in ("bin", "idx"):
            path = Path(f"{prefix}.{ext}")
            if not path.is_file() or path.stat().st_size != stats[f"{ext}_bytes"]:
                return False
    return True


def require_manifest(run_dir) -> dict:
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise BtxError(f"{manifest_path(run_dir)} does not exist: the data stage has not completed "
                       f"(run: nemo-btx data run.dir={run_dir})")
    return manifest


def dataset_prefix(run_dir, domain: str, split: str, manifest: Optional[dict] = None) -> str:
    """The megatron path prefix of one domain's split, after checking the manifest vouches for it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = manifest or require_manifest(run_dir)
    entry = manifest["domains"].get(domain)
    if entry is None:
        raise BtxError(f"domain '{domain}' is not in {manifest_path(run_dir)} (it has: "
                       f"{', '.join(manifest['domains'])}); a directory without a manifest entry "
                       "is incomplete and is never read")
    if not domain_files_intact(run_dir, domain, entry):
        raise BtxError(f"{data_dir(run_dir) / domain} does not match its manifest entry "
                       "(files missing or of another size): rerun the data stage")
    return str(data_dir(run_dir) / domain / split)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed) for writers of the data directory.

    It only saves duplicate work: every writer also renames complete results into place, so
    correctness does not depend on the lock, which matters on file systems without flock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # e.g. a network file system mounted without lock support
            log.warning("could not lock %s (%s); continuing without the lock", path, err)
        try:
            yield
        finally:
            try:
                fcntl.flock(handle, fcntl.LOCK_UN)
            except OSError:
                pass
