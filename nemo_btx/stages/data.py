"""`nemo-btx data`: the run's tokenizer and one indexed dataset per domain, streamed.

The work is the units of nemo_btx/data/plan.py, each with its own completion markers:

    nemo-btx data                                   # all of it here: tokenizer, every piece with
                                                    # data.workers processes, every merge
    nemo-btx data data.step=tokenizer               # <run.dir>/tokenizer (BPE trained on a sample)
    nemo-btx data data.step=tokenize data.unit=code:0   # one unit's pieces -> data/code/parts/
    nemo-btx data data.step=merge domain=code       # data/code/{train,valid} + manifest.json
    nemo-btx data data.step=domain domain=code      # tokenize + merge one domain (one process)

`nemo-btx run` and `nemo-btx launch` run them as separate units: the tokenizer, a Slurm array
of tokenize units, then one merge per domain (a domain of a single unit is tokenized and merged
by one `data:<domain>` unit, which saves a process start: the tiny default's case). Every step skips what is complete for the current config and inputs: touching one input
file redoes its unit and its domain's merge, nothing else. A stop request (Slurm's USR1 before a
time limit, the stop file) abandons the pieces in flight and exits 75 to be requeued; finished
pieces are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Dict, Iterator, List, Optional, Tuple

from nemo_btx.config.schema import ExperimentConfig
from nemo_btx.data import corpora, documents, indexed
from nemo_btx.data.plan import DomainPlan, Piece, find_unit, piece_fingerprint, plan_data, settings
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.run_dir import RunDir

log = logging.getLogger(__name__)

#: How long ranks other than 0 wait for rank 0's datasets (the stage under torchrun).
WAIT_SECONDS = 3600.0


# ------------------------------------------------------------------------------ status (no torch)

def tokenizer_fingerprint(cfg: ExperimentConfig, plans: List[DomainPlan]) -> dict:
    """What decides the tokenizer: the file (hf), or the BPE settings and its training sample."""
    t = cfg.data.tokenizer
    if t.kind == "hf":
        from nemo_btx.data.tokenizer import hf_tokenizer_config, hf_tokenizer_file

        path = hf_tokenizer_file(t.path, cfg.seed.checkpoint)
        # the settings beside it name the BOS and EOS the documents are stored with
        beside = json.dumps(hf_tokenizer_config(path), sort_keys=True).encode()
        return {"kind": "hf", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "config_sha256": hashlib.sha256(beside).hexdigest(),
                "eod_token": t.eod_token, "add_bos": t.add_bos}
    sample = []
    for plan in plans:
        if plan.external:
            continue
        pieces = [piece_fingerprint(cfg, plan, p, "")["inputs"] for p in plan.pieces]
        sample.append({"domain": plan.name, "inputs": pieces, **settings(cfg, plan.name)})
    return {"kind": "bpe", "vocab_size": cfg.model.vocab_size, "sample_chars": t.sample_chars,
            "eod_token": t.eod_token, "sample": sample}


def tokenizer_done(cfg: ExperimentConfig, plans: Optional[List[DomainPlan]] = None) -> bool:
    from nemo_btx.data.tokenizer import tokenizer_meta

    meta = tokenizer_meta(RunDir.of(cfg).root)
    return meta is not None and meta.get("fingerprint") == tokenizer_fingerprint(cfg, plans or plan_data(cfg))


def _tokenizer_sha(cfg: ExperimentConfig) -> Optional[str]:
    from nemo_btx.data.tokenizer import tokenizer_meta

    meta = tokenizer_meta(RunDir.of(cfg).root)
    return None if meta is None else meta["sha256"]


def piece_fingerprints(cfg: ExperimentConfig, plan: DomainPlan, tokenizer_sha: str) -> List[dict]:
    return [piece_fingerprint(cfg, plan, p, tokenizer_sha) for p in plan.pieces]


def unit_done(cfg: ExperimentConfig, plan: DomainPlan, k: int) -> bool:
    """Every piece of the unit is tokenized for the current inputs and tokenizer."""
    from nemo_btx.data.shards import piece_done

    sha = _tokenizer_sha(cfg)
    if sha is None:
        return False
    rd = RunDir.of(cfg)
    return all(piece_done(rd.root, p, piece_fingerprint(cfg, plan, p, sha)) for p in plan.unit_pieces(k))


def domain_done(cfg: ExperimentConfig, plan: DomainPlan) -> bool:
    from nemo_btx.data.merge import domain_done as done, domain_fingerprint

    sha = _tokenizer_sha(cfg)
    if sha is None:
        return False
    return done(RunDir.of(cfg).root, plan, domain_fingerprint(cfg, plan, piece_fingerprints(cfg, plan, sha)))


# ------------------------------------------------------------------------------ the stage

def run(cfg: ExperimentConfig) -> Optional[dict]:
    """One step of the data stage (data.step), or all of them; returns the data manifest when
    every domain is complete."""
    # A worker is one core; the Rust tokenizer's own thread pool would compete with the others.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nemo_btx.runtime import preemption

    preemption.install()
    plans = plan_data(cfg)
    names = [p.name for p in plans]
    if int(os.environ.get("RANK", "0")) != 0:
        return _wait_for_rank0(cfg, plans)
    step = cfg.data.step
    if step in ("all", "tokenizer"):
        build_tokenizer(cfg, plans)
        if step == "tokenizer":
            return None
    tokenizer = _load_tokenizer(cfg)
    if step == "tokenize":
        if cfg.data.unit is None:
            raise ConfigError("data.unit", None, "data.step=tokenize needs data.unit=<domain>:<k>; units: "
                              + ", ".join(u for p in plans for u in p.unit_names()))
        plan, k = find_unit(plans, cfg.data.unit)
        tokenize(cfg, plans, plan.unit_pieces(k), tokenizer, label=f"unit {cfg.data.unit}")
        return None
    if step in ("merge", "domain"):
        if cfg.domain is None:
            raise ConfigError("domain", None, f"data.step={step} needs domain=<name> (domains: {', '.join(names)})")
        plan = next((p for p in plans if p.name == cfg.domain), None)
        if plan is None:
            raise ConfigError("domain", cfg.domain, f"must be one of {', '.join(names)}")
        if step == "domain":
            tokenize(cfg, plans, plan.pieces, tokenizer, label=plan.name)
        merge(cfg, plan, tokenizer)
        return indexed.read_manifest(RunDir.of(cfg).root, names)
    # all: every pending piece of every domain in one pool, then every merge.
    tokenize(cfg, plans, [p for plan in plans for p in plan.pieces], tokenizer, label="all domains")
    for plan in plans:
        merge(cfg, plan, tokenizer)
    return indexed.read_manifest(RunDir.of(cfg).root, names)


def _load_tokenizer(cfg: ExperimentConfig):
    from nemo_btx.data.tokenizer import check_vocab, load_tokenizer

    rd = RunDir.of(cfg)
    if not tokenizer_done(cfg):
        raise BtxError(f"{rd.tokenizer}: no tokenizer for this config yet; run `nemo-btx data "
                       f"data.step=tokenizer run.dir={cfg.run.dir}` first")
    tok = load_tokenizer(rd.root)
    check_vocab(tok, cfg.model)
    return tok


def tokenize(cfg: ExperimentConfig, plans: List[DomainPlan], pieces: List[Piece], tokenizer, label: str) -> None:
    from nemo_btx.data import shards

    rd = RunDir.of(cfg)
    by_name = {p.name: p for p in plans}
    fps: Dict[Tuple[str, int], dict] = {}
    todo = []
    for piece in pieces:
        fp = piece_fingerprint(cfg, by_name[piece.domain], piece, tokenizer.sha256)
        fps[(piece.domain, piece.index)] = fp
        if not shards.piece_done(rd.root, piece, fp):
            todo.append(piece)
    for d in {p.domain for p in pieces}:  # left by a killed run (no writer is active now)
        for tmp in rd.data_parts(d).glob(".*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    if not todo:
        log.info("data %s: every piece is tokenized for this config and these inputs; skipping", label)
        return
    log.info("data %s: %d of %d pieces to tokenize", label, len(todo), len(pieces))
    shards.tokenize_pieces(cfg, plans, todo, fps, label)


def merge(cfg: ExperimentConfig, plan: DomainPlan, tokenizer) -> None:
    from nemo_btx.data import merge as merging

    rd = RunDir.of(cfg)
    fps = piece_fingerprints(cfg, plan, tokenizer.sha256)
    if merging.domain_done(rd.root, plan, merging.domain_fingerprint(cfg, plan, fps)):
        log.info("data %s: complete for this config and these inputs; skipping", plan.name)
        return
    with indexed.file_lock(rd.data / ".lock"):
        if plan.external:
            merging.register_external(cfg, plan, tokenizer)
        else:
            merging.merge_domain(cfg, plan, fps, tokenizer)


# ------------------------------------------------------------------------------ tokenizer

def build_tokenizer(cfg: ExperimentConfig, plans: List[DomainPlan]) -> None:
    """Load the configured tokenizer (hf) or train the BPE on a bounded sample of every domain's
    training documents, and save it with its fingerprint; skipped when current."""
    from nemo_btx.data.tokenizer import make_tokenizer, save_tokenizer

    rd = RunDir.of(cfg)
    fp = tokenizer_fingerprint(cfg, plans)
    if tokenizer_done(cfg, plans):
        log.info("data: tokenizer %s is current; skipping", rd.tokenizer)
        return
    start = time.perf_counter()
    counted = {"documents": 0, "chars": 0}
    tok = make_tokenizer(cfg, _bpe_sample(cfg, plans, counted) if cfg.data.tokenizer.kind == "bpe" else [])
    with indexed.file_lock(rd.data / ".lock"):
        save_tokenizer(tok, rd.root, fingerprint=fp)
    what = (f"trained on {counted['documents']} documents / {counted['chars']} characters"
            if cfg.data.tokenizer.kind == "bpe" else f"from {cfg.data.tokenizer.path}")
    log.info("data: tokenizer %s with %d tokens, %s (%.1f s)", cfg.data.tokenizer.kind, tok.vocab_size,
             what, time.perf_counter() - start)


def _bpe_sample(cfg: ExperimentConfig, plans: List[DomainPlan], counted: dict) -> Iterator[str]:
    """The first `data.tokenizer.sample_chars` characters of each domain's training documents,
    domain after domain, streamed (the BPE trainer counts words as they come)."""
    from nemo_btx.data import readers

    d = cfg.data
    budget = d.tokenizer.sample_chars
    for plan in plans:
        if plan.external:
            continue
        src, used = plan.source, 0
        for piece in plan.pieces:
            if piece.chunk is None:
                docs = corpora.iter_stream(src, d, skip_bad=d.skip_bad_records, bad=readers.BadRecords())
            else:
                docs = readers.read_chunk(piece.chunk, text_key=src.text_key, skip_bad=d.skip_bad_records,
                                          bad=readers.BadRecords(), where_key=f"data.domains.{src.index}")
            for text in docs:
                if not text.strip() or documents.held_out(text, seed=d.seed, domain=plan.name,
                                                          fraction=d.valid_fraction):
                    continue
                if budget is not None and used + len(text) > budget:
                    text = text[:budget - used]
                counted["documents"] += 1
                counted["chars"] += len(text)
                used += len(text)
                yield text
                if budget is not None and used >= budget:
                    break
            if budget is not None and used >= budget:
                break


def _wait_for_rank0(cfg: ExperimentConfig, plans: List[DomainPlan]) -> dict:
    """The manifest once rank 0 has made every domain current: the manifests of an earlier
    config (or inputs) are complete too, and must not be read while rank 0 replaces them."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if tokenizer_done(cfg, plans) and all(domain_done(cfg, p) for p in plans):
            manifest = indexed.read_manifest(RunDir.of(cfg).root, [p.name for p in plans])
            if manifest is not None:
                return manifest
        time.sleep(1.0)
    raise BtxError(f"rank 0 did not complete {RunDir.of(cfg).data} within {WAIT_SECONDS:.0f} s")


def describe(manifest: dict) -> str:
    """Per-domain token counts, for logs and `nemo-btx data` output."""
    parts = []
    for name, m in manifest["domains"].items():
        tr, va = m["splits"]["train"], m["splits"]["valid"]
        parts.append(f"{name}: {tr['tokens']} + {va['tokens']} tokens")
    return "; ".join(parts)

