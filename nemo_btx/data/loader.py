"""What the training loop reads: deterministic global batches from megatron-core GPT datasets.

`TrainData` blends one or more domains' training splits with megatron-core's `GPTDataset`
(documents concatenated and cut into `seq_length + 1` windows, shuffled with `train.seed`, epochs
repeated as needed) and `BlendedDataset` (its C++ helper assigns every sample to a domain so that
any prefix of the stream follows the weights as closely as possible, deterministically).
`global_batch(step)` is rows `[step * B, (step + 1) * B)` of that stream, so a batch is a pure
function of (config, seed, step): a run resumed at step k reads exactly what an uninterrupted
run reads, with no loader state to checkpoint.

Index caches (`document_index`, `sample_index`, `shuffle_index` .npy files) live in
`<run.dir>/data/cache/<key>/`, where the key hashes everything they depend on, including the
data manifest, so a rebuilt dataset never meets a stale cache. One process builds a cache into
a temporary directory and renames it into place; the others wait for the directory to appear:

- with torch.distributed initialised, global rank 0 builds and the other ranks poll (no
  collective, so it also works when only some ranks ask, e.g. validation on rank 0 alone);
- without it, independent processes serialise on a file lock, and the first one builds.

Why not `BlendedMegatronDatasetBuilder.build()`: its rank-0-then-barrier protocol needs every rank
to call it at the same moment, and `BlendedDataset`'s cache path calls
`torch.distributed.get_rank()` without checking that a process group exists, so it fails in a
plain process. The blending index is cheap (one C++ pass), so it is rebuilt in memory each time
and only the GPT indices are cached; the mid-level sizes follow the builder's rule (target share
of the samples plus `mid_level_dataset_surplus`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from nemo_btx.artifacts import make_tmp_dir
from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.data import indexed
from nemo_btx.data.tokenizer import check_vocab
from nemo_btx.errors import BtxError, ConfigError

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
#: How long a process waits for another one to finish building an index cache.
WAIT_SECONDS = 1800.0
_SURPLUS = 0.005


class _TokenizerView:
    """The little of a tokenizer megatron-core's GPT datasets read: sizes and special ids.

    There is deliberately no `pad`: megatron then pads with -1, an id no document contains.
    """

    def __init__(self, manifest: dict):
        tok = manifest["tokenizer"]
        self.vocab_size = tok["vocab_size"]
        self.eod = tok["eod_id"]
        self.unique_identifiers = {"class": "nemo_btx", "sha256": tok["sha256"],
                                   "vocab_size": self.vocab_size, "eod": self.eod}


class _DropUncachedBlendWarning(logging.Filter):
    """BlendedDataset warns on every build that it has no cache path: that is by design here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "path_to_cache is None" not in record.getMessage()


logging.getLogger("megatron.core.datasets.blended_dataset").addFilter(_DropUncachedBlendWarning())


def _dist_rank() -> Optional[int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return None


def _manifest_and_hash(run_dir, domains: Sequence[str]) -> tuple:
    """The datasets of `domains` and a hash of their manifests (index caches are keyed by it)."""
    manifest = indexed.require_manifest(run_dir, domains)
    return manifest, hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _cached(run_dir, description: dict, build: Callable[[Optional[str]], object]):
    """`build(cache_dir)` with the cache directory for `description` built exactly once.

    `build` must construct the datasets against the given cache directory: on a cache miss
    megatron writes the index files there, on a hit it memory-maps them.
    """
    # megatron names its files after a hash that includes the absolute dataset paths: a run
    # directory that moved must not find (and half-match) the caches of its old location.
    description = {**description, "run_dir": str(Path(run_dir).resolve())}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
    root = indexed.data_dir(run_dir) / CACHE_DIR
    final = root / key
    if final.is_dir():
        return build(str(final))
    rank = _dist_rank()
    if rank is not None and rank != 0:
        deadline = time.monotonic() + WAIT_SECONDS
        while not final.is_dir():
            if time.monotonic() > deadline:
                raise BtxError(f"rank 0 did not build the dataset index cache {final} within "
                               f"{WAIT_SECONDS:.0f} s (does rank 0 build the same data?)")
            time.sleep(0.2)
        return build(str(final))
    with indexed.file_lock(root / ".lock"):
        if not final.is_dir():
            tmp = make_tmp_dir(root, f".{key}.tmp.")
            try:
                (tmp / "description.json").write_text(json.dumps(description, indent=2, sort_keys=True))
                build(str(tmp))
                try:
                    os.rename(tmp, final)
                except OSError:  # another process (without a working lock) got there first
                    shutil.rmtree(tmp, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return build(str(final))


def _gpt_config(cfg: ExperimentConfig, manifest: dict, prefixes: List[str], weights, seed: int,
                split: str, cache: Optional[str]):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed, sequence_length=cfg.model.seq_length, blend=(prefixes, weights),
        split=split, path_to_cache=cache, tokenizer=_TokenizerView(manifest),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mid_level_dataset_surplus=_SURPLUS)


def _gpt_dataset(prefix: str, num_samples: int, index_split, config, docs: Optional[np.ndarray] = None):
    """megatron's GPTDataset over the documents `docs` of one .bin/.idx (default: all of them; a
    domain carved out of an existing dataset reads only its split's documents)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    low = GPTDataset.build_low_level_dataset(prefix, config)
    if docs is None:
        docs = np.arange(GPTDataset.numel_low_level_dataset(low), dtype=np.int32)
    return GPTDataset(low, prefix, docs, num_samples, index_split, config)


def _check_tokenizer(run_dir, manifest: dict) -> None:
    from nemo_btx.data.tokenizer import load_tokenizer

    sha = load_tokenizer(run_dir).sha256
    for name, entry in manifest["domains"].items():
        if entry["tokenizer"]["sha256"] != sha:
            raise BtxError(f"{run_dir}/tokenizer does not match the tokenizer the data of '{name}' was "
                           "built with: rerun the data stage")


def _row(sample: dict) -> torch.Tensor:
    """The `seq_length + 1` ids of one sample (megatron hands them out shifted by one)."""
    return torch.cat([sample["tokens"], sample["labels"][-1:]])


class TrainData:
    """The training stream of a weighted mixture of domains (one domain: that domain alone).

    Args:
        cfg: the experiment config (train.seed, train.train_iters, train.global_batch_size,
            model.seq_length are read).
        run_dir: the run directory holding `data/manifest.json`.
        domains: the domains to read, by name.
        weights: their shares of the samples (normalised); None = each domain's
            `data.domains.<i>.weight`. A zero weight leaves a domain out.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir, domains: Sequence[str],
                 weights: Optional[Sequence[float]] = None):
        from megatron.core.datasets.blended_dataset import BlendedDataset
        from megatron.core.datasets.utils import Split

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.domains = list(domains)
        if not self.domains:
            raise BtxError("TrainData needs at least one domain")
        self.weights = self._weights(cfg, self.domains, weights)
        self.global_batch_size = cfg.train.global_batch_size
        self.num_samples = cfg.train.train_iters * cfg.train.global_batch_size
        manifest, manifest_hash = _manifest_and_hash(run_dir, self.domains)
        _check_tokenizer(run_dir, manifest)
        check_vocab(SimpleNamespace(vocab_size=manifest["tokenizer"]["vocab_size"]), cfg.model)  # type: ignore[arg-type]
        # Domains with weight 0 take no part; `_members` maps blend positions back to `domains`.
        self._members = [i for i, w in enumerate(self.weights) if w > 0]
        prefixes = [indexed.dataset_prefix(run_dir, self.domains[i], "train", manifest) for i in self._members]
        subsets = [indexed.document_subset(run_dir, self.domains[i], "train", manifest) for i in self._members]
        weights = [self.weights[i] for i in self._members]
        targets = [math.ceil(self.num_samples * w) for w in weights]
        sizes = [math.ceil(t * (1 + _SURPLUS)) for t in targets] if len(prefixes) > 1 else [self.num_samples]
        description = {"kind": "train", "manifest": manifest_hash, "domains": [self.domains[i] for i in self._members],
                       "weights": weights, "sizes": sizes, "seed": cfg.train.seed,
                       "seq_length": cfg.model.seq_length}

        def build(cache: Optional[str]):
            config = _gpt_config(cfg, manifest, prefixes, weights if len(prefixes) > 1 else None,
                                 cfg.train.seed, "1,0,0", cache)
            parts = [_gpt_dataset(p, n, Split.train, config, docs)
                     for p, n, docs in zip(prefixes, sizes, subsets)]
            return parts

        self._parts = _cached(run_dir, description, build)
        if len(self._parts) > 1:
            uncached = dataclasses.replace(self._parts[0].config, path_to_cache=None)
            self._blend = BlendedDataset(self._parts, weights, sum(targets), uncached)
        else:
            self._blend = None
        self._length = len(self._blend) if self._blend is not None else len(self._parts[0])

    @staticmethod
    def _weights(cfg: ExperimentConfig, domains: List[str], weights) -> List[float]:
        if weights is None:
            by_name = {d.name: d.weight for d in cfg.data.domains}
            missing = [d for d in domains if d not in by_name]
            if missing:
                raise BtxError(f"domains {missing} are not in data.domains; pass their weights")
            weights = [by_name[d] for d in domains]
        weights = [float(w) for w in weights]
        if len(weights) != len(domains):
            raise BtxError(f"{len(weights)} weights for {len(domains)} domains")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError("data.domains.*.weight", weights, "weights must be >= 0 with a positive sum")
        total = sum(weights)
        return [w / total for w in weights]

    def __len__(self) -> int:
        """Samples in the stream (at least train_iters * global_batch_size)."""
        return self._length

    def _indices(self, step: int) -> range:
        b = self.global_batch_size
        if step < 0 or (step + 1) * b > self._length:
            raise BtxError(f"step {step} is past the data built for train.train_iters="
                           f"{self.cfg.train.train_iters} ({self._length} samples of {b} per step)")
        return range(step * b, (step + 1) * b)

    def global_batch(self, step: int) -> torch.Tensor:
        """`[global_batch_size, seq_length + 1]` token ids of optimizer step `step` (int64)."""
        if self._blend is not None:
            rows = [_row(self._blend[i]) for i in self._indices(step)]
        else:
            rows = [_row(self._parts[0][i]) for i in self._indices(step)]
        return torch.stack(rows).long()

    def batch_domains(self, step: int) -> torch.Tensor:
        """Index into `domains` of the domain each row of `global_batch(step)` comes from."""
        idx = self._indices(step)
        if self._blend is None:
            return torch.full((len(idx),), self._members[0], dtype=torch.long)
        members = torch.tensor(self._members, dtype=torch.long)
        return members[torch.as_tensor(np.asarray(self._blend.dataset_index[idx.start:idx.stop]), dtype=torch.long)]


def validation_batches(cfg: ExperimentConfig, run_dir, domain: str, num_batches: int) -> List[torch.Tensor]:
    """`num_batches` fixed held-out batches of `domain`, each `[global_batch_size, seq_length + 1]`.

    Drawn from the domain's valid split with `data.seed` (not `train.seed`), so every model of an
    experiment, and every experiment on the same data, is scored on the same tokens.
    """
    from megatron.core.datasets.utils import Split

    if num_batches < 1:
        raise ConfigError("data.eval_iters", num_batches, "must be >= 1")
    manifest, manifest_hash = _manifest_and_hash(run_dir, [domain])
    _check_tokenizer(run_dir, manifest)
    prefix = indexed.dataset_prefix(run_dir, domain, "valid", manifest)
    subset = indexed.document_subset(run_dir, domain, "valid", manifest)
    b, seq = cfg.train.global_batch_size, cfg.model.seq_length
    tokens = manifest["domains"][domain]["splits"]["valid"]["tokens"]
    if tokens < seq + 1:
        raise BtxError(f"the valid split of '{domain}' has {tokens} tokens, fewer than one sequence "
                       f"(model.seq_length + 1 = {seq + 1}); raise data.valid_fraction or add documents")
    num_samples = num_batches * b
    description = {"kind": "valid", "manifest": manifest_hash, "domain": domain,
                   "num_samples": num_samples, "seed": cfg.data.seed, "seq_length": seq}

    def build(cache: Optional[str]):
        config = _gpt_config(cfg, manifest, [prefix], None, cfg.data.seed, "0,1,0", cache)
        return _gpt_dataset(prefix, num_samples, Split.valid, config, subset)

    dataset = _cached(run_dir, description, build)
    return [torch.stack([_row(dataset[i]) for i in range(k * b, (k + 1) * b)]).long()
            for k in range(num_batches)]
