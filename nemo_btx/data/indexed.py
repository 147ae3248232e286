"""Per-domain megatron-core indexed datasets (`.bin/.idx`) and the manifests that vouch for them.

Layout under ``<run.dir>/data/<domain>/``::

    manifest.json            written last by the domain's merge: the only proof it is complete
    train.bin, .idx          one megatron "document" per source document: ids + end-of-document
    valid.bin, .idx          held-out documents of the same domain (never in train)
    parts/<id>.{train,valid}.{bin,idx}, <id>.json   the pieces the merge concatenated (shards.py)

and ``<run.dir>/data/cache/`` for GPTDataset index caches (loader.py). A domain given as an
existing megatron dataset (`data.domains.<i>.prefix`) has only a manifest here, naming the
prefix(es) it is read from in place and how its validation documents are carved out.

Each domain has its own manifest, so a changed input or a crash rebuilds that domain only; the
dataset view of the whole run (`read_manifest`) is assembled from the tokenizer's meta.json and
the domains' manifests. The split is by document, never by token: a validation document is
never seen in training, even in part (nemo_btx/data/documents.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

from nemo_btx.artifacts import read_json, write_json_atomic
from nemo_btx.errors import BtxError
from nemo_btx.run_dir import RunDir

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SPLITS = ("train", "valid")


def data_dir(run_dir) -> Path:
    return RunDir(run_dir).data


def domain_manifest_path(run_dir, domain: str) -> Path:
    return RunDir(run_dir).data_manifest(domain)


def read_domain_manifest(run_dir, domain: str) -> Optional[dict]:
    """A domain's manifest, or None when its merge has not completed (or is of an old format)."""
    try:
        manifest = read_json(domain_manifest_path(run_dir, domain))
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == FORMAT_VERSION else None


def write_domain_manifest(run_dir, domain: str, manifest: dict) -> None:
    write_json_atomic(domain_manifest_path(run_dir, domain), {"format": FORMAT_VERSION, **manifest})


def remove_domain_manifest(run_dir, domain: str) -> None:
    """Withdraw the proof of completeness before any file it vouches for is touched."""
    domain_manifest_path(run_dir, domain).unlink(missing_ok=True)


def read_manifest(run_dir, domains: Optional[Sequence[str]] = None) -> Optional[dict]:
    """The run's datasets: {"tokenizer": meta, "domains": {name: manifest}} for `domains` (default:
    every domain directory with a manifest), or None when the tokenizer or a domain is missing."""
    from nemo_btx.data.tokenizer import tokenizer_meta

    meta = tokenizer_meta(run_dir)
    if meta is None:
        return None
    if domains is None:
        domains = sorted(p.parent.name for p in data_dir(run_dir).glob("*/manifest.json"))
    out = {}
    for d in domains:
        m = read_domain_manifest(run_dir, d)
        if m is None:
            return None
        out[d] = m
    return {"tokenizer": meta, "domains": out}


def require_manifest(run_dir, domains: Optional[Sequence[str]] = None) -> dict:
    manifest = read_manifest(run_dir, domains)
    if manifest is None:
        missing = [d for d in (domains or []) if read_domain_manifest(run_dir, d) is None]
        what = (f"no complete dataset for {', '.join(missing)}" if missing
                else "no tokenizer or no complete domain")
        raise BtxError(f"{data_dir(run_dir)}: {what}: the data stage has not completed "
                       f"(run: nemo-btx data run.dir={run_dir})")
    return manifest


def domain_files_intact(run_dir, name: str, entry: dict) -> bool:
    """Whether the files a domain's manifest describes exist with the recorded sizes."""
    for split in SPLITS:
        stats = entry["splits"][split]
        prefix = split_prefix(run_dir, name, split, entry)
        for ext in ("bin", "idx"):
            path = Path(f"{prefix}.{ext}")
            want = stats.get(f"{ext}_bytes")
            if not path.is_file() or (want is not None and path.stat().st_size != want):
                return False
    return True


def split_prefix(run_dir, domain: str, split: str, entry: dict) -> str:
    """Where a split's .bin/.idx are: the domain's directory, or an external dataset."""
    ext = entry.get("external")
    if ext is None:
        return str(RunDir(run_dir).data_domain(domain) / split)
    if split == "valid" and ext.get("valid_prefix"):
        return ext["valid_prefix"]
    return ext["prefix"]


def dataset_prefix(run_dir, domain: str, split: str, manifest: Optional[dict] = None) -> str:
    """The megatron path prefix of one domain's split, after checking its manifest vouches for it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entry = (manifest or {}).get("domains", {}).get(domain) if manifest else read_domain_manifest(run_dir, domain)
    if entry is None:
        raise BtxError(f"domain '{domain}': no {domain_manifest_path(run_dir, domain)} (its merge has "
                       "not completed); a directory without a manifest is incomplete and is never read")
    if not domain_files_intact(run_dir, domain, entry):
        raise BtxError(f"{RunDir(run_dir).data_domain(domain)} does not match its manifest "
                       "(files missing or of another size): rerun the data stage")
    return split_prefix(run_dir, domain, split, entry)


def document_subset(run_dir, domain: str, split: str, manifest: Optional[dict] = None) -> Optional[np.ndarray]:
    """The documents of a split that is carved out of one external dataset (by the hash rule on
    each document's position), or None when the split is a whole dataset."""
    entry = (manifest or {}).get("domains", {}).get(domain) if manifest else read_domain_manifest(run_dir, domain)
    ext = (entry or {}).get("external")
    if ext is None or ext.get("valid_prefix"):
        return None
    return carve(ext["documents"], split, seed=ext["split"]["seed"], domain=domain,
                 fraction=ext["split"]["valid_fraction"])


def carve(num_documents: int, split: str, *, seed: int, domain: str, fraction: float) -> np.ndarray:
    """Document indices of `split` when validation documents are carved out of one dataset."""
    from nemo_btx.data.documents import held_out_positions

    held = held_out_positions(num_documents, seed=seed, domain=domain, fraction=fraction)
    return np.flatnonzero(held if split == "valid" else ~held).astype(np.int32)


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


def domains_of(manifest: dict) -> List[str]:
    return list(manifest["domains"])
