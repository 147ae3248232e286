#!/usr/bin/env python
"""Issue 15: the streaming data stage — tokenize throughput, scaling, memory, format round-trip.

Targets, measured in ONE run and printed next to their references:

1. One worker against the limit: tokens/s of the data stage's tokenize step with
   `data.workers=1` on a generated 100 MB .jsonl corpus, vs the same tokenizer's Rust
   `encode_batch` (TOKENIZERS_PARALLELISM=false: one thread) on the same documents already in
   memory, in batches of the same `data.buffer_size`. Target >= 0.8x.
2. Two workers vs one on this 2-core machine, same corpus: target >= 1.7x tokens/s.
3. Peak RSS per worker process for a 100 MB and a 1 GB corpus (same `data.chunk_size`): the
   larger within 1.2x of the smaller. The merge process's peak RSS is reported for both
   (informative: megatron's IndexedDatasetBuilder keeps the index of the whole domain in
   Python lists, ~70 B per document, the one place where memory grows with the corpus).
4. Every input format (jsonl, jsonl.gz, jsonl.zst, parquet, text) gives byte-identical
   .bin/.idx for the same documents (a small corpus, through the whole data stage).

The corpus: documents cut from the Python stdlib sources and the gensim Wikipedia sample (the
text of the builtin `code` and `wiki` corpora, nemo_btx/data/corpora.py): random line-aligned
slices of 200-20,000 characters, 60% code / 40% prose, each with a few of its words replaced by
random variants so that a 100 MB or 1 GB corpus is not a few MB repeated and the BPE meets
unseen words. One .jsonl file (`ensure_ascii=False`), so a plan cuts it into equal byte ranges
(100 MB at the default 64MB chunk: 2 pieces; 1 GB: 16). The tokenizer is a byte-level BPE of
`--vocab` ids trained once with `train_bpe` on the first 8 MB of the corpus, saved as
tokenizer.json and given as `data.tokenizer.kind=hf`: tokenizer training is never timed. Corpus
and tokenizer are cached in `--work-dir`; the 1 GB corpus and every run directory are deleted
at the end.

What is timed, each in a fresh process (`--child`, so peak RSS is its own):

- stage: `nemo_btx.stages.data.tokenize` over every piece (fingerprints, skip check, then
  `shards.tokenize_pieces`: the worker pool with its start-up, reading, dedup, split,
  `Tokenizer.encode_documents`, the partial .bin/.idx and markers). Planning, the tokenizer
  step and imports (megatron.core is imported before the clock starts, as the stage does when
  it loads its tokenizer dtype; forked workers inherit it) are not timed. tokens = the tokens
  the pieces' markers count (one end-of-document id per document included).
- merge: `nemo_btx.stages.data.merge` of the domain, reported separately (time and peak RSS),
  then once more with merge.py's `gc.freeze()` made a no-op, to show what it saves: megatron's
  `IndexedDatasetBuilder.add_index` runs `gc.collect()` once per partial dataset, a full
  collection over everything torch and megatron allocated at import (0.17 s each on an idle
  2-core machine, more under load); both merges are checked to write the same bytes.
- reference: `encode_batch(batch, add_special_tokens=False)` of the Rust backend, same
  tokenizer object settings (`encode_special_tokens=True`), same batches; tokens = its ids + one
  end-of-document id per document, so both sides count the same tokens and the ratio is a ratio
  of times. Also printed: the cost of `[e.ids for e in ...]` (any Python caller pays it) and the
  readers' throughput (read + JSON decode, nemo_btx/data/readers.py) on the same file.

Per-worker peak RSS: psutil samples every `--sample` s of each pool worker's RSS, and the exact
high-water mark over all workers (getrusage RUSAGE_CHILDREN after the pool is joined). A forked
worker's RSS includes the ~410 MB it inherits (python, torch, megatron: shared copy-on-write);
what it adds is set by `data.buffer_size` (the Encodings and the id lists of one batch, ~35x the
buffered text), not by the corpus. Each timed phase also records the CPU our processes used and
what the rest of the machine used (/proc/stat): other jobs on a 2-core machine change
wall-clock figures, and a tokens per CPU-second ratio is printed that they hardly affect.
`--repeats N` keeps the best of N for the reference and both stage runs.

    .venv/bin/python bench/data_throughput.py --repeats 2 --json runs/bench/data_throughput.json
    .venv/bin/python bench/data_throughput.py --size 20MB --large-size 100MB --chunk-size 5MB  # quick
    .venv/bin/python bench/data_throughput.py --buffer-size 4MB data.dedup=none  # + config overrides
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

from nemo_btx.config.schema import DataConfig

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Bump when the generated text changes (invalidates the cached corpus and tokenizer).
CORPUS_VERSION = 2
DOMAIN = "user"
FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text")
TARGETS = {"one_worker": 0.8, "two_workers": 1.7, "memory": 1.2}
CLK = os.sysconf("SC_CLK_TCK")


def _size(text: str) -> int:
    from nemo_btx.config.sizes import parse_size

    return parse_size(text)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


# ------------------------------------------------------------------------------ the corpus


class DocumentGenerator:
    """Endless documents: slices of stdlib sources and Wikipedia articles, with variations."""

    def __init__(self, seed: int):
        from nemo_btx.data import corpora

        self.code = [d.replace("\r", "") for d in corpora.code_documents(0) if len(d) > 200]
        self.prose = [d for d in corpora.wiki_articles() if len(d) > 200]
        words = Counter(w for d in self.code[:200] + self.prose for w in re.findall(r"[A-Za-z_]{4,}", d))
        self.words = [w for w, _ in words.most_common(4000)]
        self.rng = random.Random(f"nemo-btx-bench-data-{seed}")

    def _variant(self, word: str) -> str:
        r = self.rng
        kind = r.randrange(4)
        letters = "abcdefghijklmnopqrstuvwxyz"
        if kind == 0:
            return word + "".join(r.choice(letters) for _ in range(r.randint(1, 3)))
        if kind == 1:
            return "".join(r.choice(letters) for _ in range(r.randint(1, 3))) + word
        if kind == 2:
            return word.capitalize() if word.islower() else word.lower()
        i = r.randrange(1, len(word))
        return word[:i] + r.choice(letters) + word[i:]

    def __iter__(self):
        r = self.rng
        while True:
            src = r.choice(self.code if r.random() < 0.6 else self.prose)
            length = int(200 * 100 ** r.random())  # 200 .. 20,000 characters, log-uniform
            start = 0
            if len(src) > length:
                start = src.find("\n", r.randrange(len(src) - length)) + 1
            doc = src[start:start + length].strip()
            if len(doc) < 20:
                continue
            for word in r.sample(self.words, 4):
                doc = doc.replace(word, self._variant(word))
            yield doc


def write_jsonl(path: Path, target_bytes: int, seed: int) -> dict:
    """A .jsonl of about `target_bytes`; returns its document count and size."""
    tmp = path.with_name(path.name + ".tmp")
    n = size = 0
    lines: List[str] = []
    seen = set()  # no exact repeats: the stage's per-chunk dedup would drop them
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in DocumentGenerator(seed):
            digest = hashlib.blake2b(doc.encode(), digest_size=8).digest()
            if digest in seen:
                continue
            seen.add(digest)
            line = json.dumps({"id": n, "text": doc}, ensure_ascii=False) + "\n"
            lines.append(line)
            n += 1
            size += len(line.encode("utf-8")) if not line.isascii() else len(line)
            if len(lines) >= 1000 or size >= target_bytes:
                f.write("".join(lines))
                lines.clear()
            if size >= target_bytes:
                break
    os.replace(tmp, path)
    return {"documents": n, "bytes": path.stat().st_size}


def prepare(args) -> dict:
    """The cached corpus of `--size` and its tokenizer (trained once); (re)built if stale."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    size = _size(args.size)
    key = {"version": CORPUS_VERSION, "bytes": size, "vocab": args.vocab, "seed": args.seed,
           "python": sys.version.split()[0]}
    meta_path, corpus, tok_path = work / "corpus.json", work / "corpus.jsonl", work / "tokenizer.json"
    if meta_path.is_file() and corpus.is_file() and tok_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            print(f"[bench] cached corpus {corpus} ({_mb(meta['bytes'])}, {meta['documents']:,} documents) "
                  f"and tokenizer {tok_path}", flush=True)
            return {**meta, "corpus": str(corpus), "tokenizer": str(tok_path)}
    t = time.perf_counter()
    info = write_jsonl(corpus, size, args.seed)
    print(f"[bench] generated {corpus}: {_mb(info['bytes'])}, {info['documents']:,} documents "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    t = time.perf_counter()
    from nemo_btx.data.tokenizer import train_bpe

    def sample(limit=8_000_000):
        used = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                yield text
                used += len(text)
                if used >= limit:
                    return

    tok = train_bpe(sample(), args.vocab)
    tok_path.write_text(tok.to_str(), encoding="utf-8")
    print(f"[bench] trained the BPE once: {tok.vocab_size} ids on 8 MB of the corpus "
          f"({time.perf_counter() - t:.0f} s), saved {tok_path}", flush=True)
    meta = {"key": key, **info, "vocab_size": tok.vocab_size}
    meta_path.write_text(json.dumps(meta, indent=2))
    return {**meta, "corpus": str(corpus), "tokenizer": str(tok_path)}


# ------------------------------------------------------------------------------ load accounting


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


class Load:
    """CPU our processes used (self + reaped children) and the machine's, over a region."""

    def __enter__(self):
        self.t, self.busy, self.ours = time.perf_counter(), _busy_jiffies(), self._ours()
        self.loadavg = os.getloadavg()[0]
        return self

    @staticmethod
    def _ours() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.cpu = self._ours() - self.ours
        machine = (_busy_jiffies() - self.busy) / CLK
        self.others = max(0.0, machine - self.cpu) / max(self.wall, 1e-9)

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3),
                "our_cores": round(self.cpu / max(self.wall, 1e-9), 3),
                "other_cores": round(self.others, 3), "loadavg_before": round(self.loadavg, 2)}


def _peak_rss() -> int:
    """This process's peak RSS (bytes) since start or since `_reset_peak_rss`."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024


def _reset_peak_rss() -> None:
    """Start the peak RSS afresh (Linux >= 4.0), so imports before a measurement do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------ children


def _overrides(a, workers: int, step: str) -> List[str]:
    out = [f"run.dir={a.run_dir}", f"data.domains=[{{name: {DOMAIN}, source: '{a.source}'}}]",
           "data.tokenizer.kind=hf", f"data.tokenizer.path={a.tokenizer}",
           f"model.vocab_size={a.vocab}", "data.max_chars_per_domain=null",
           f"data.chunk_size={a.chunk_size}", f"data.buffer_size={a.buffer_size}",
           f"data.workers={workers}", f"data.step={step}"]
    if step == "merge":
        out.append(f"domain={DOMAIN}")
    return out + list(a.overrides)


def child_stage(a) -> dict:
    """The tokenize step over every piece, timed; per-worker peak RSS."""
    import psutil

    from nemo_btx.config import load_config
    from nemo_btx.data.plan import plan_data
    from nemo_btx.stages import data as stage

    stage.run(load_config(_overrides(a, a.workers, "tokenizer")))  # copies tokenizer.json: untimed
    cfg = load_config(_overrides(a, a.workers, "all"))
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: F401

    plans = plan_data(cfg)
    tokenizer = stage._load_tokenizer(cfg)
    pieces = [p for plan in plans for p in plan.pieces]
    me = psutil.Process()
    peaks: Dict[int, int] = {}
    lows: Dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for p in me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
                if rss:  # the first sample of a worker: what it inherited by fork (0: a zombie)
                    lows.setdefault(p.pid, rss)
            done.wait(a.sample)

    sampler = threading.Thread(target=sample, daemon=True)
    if a.workers > 1:
        sampler.start()
    rss_before = _current_rss()
    _reset_peak_rss()
    with Load() as load:
        stage.tokenize(cfg, plans, pieces, tokenizer, label="bench")
    done.set()
    if a.workers > 1:
        sampler.join()
    parts = Path(a.run_dir) / "data" / DOMAIN / "parts"
    markers = [json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))]
    assert len(markers) == len(pieces), (len(markers), len(pieces))
    tokens = sum(s["tokens"] for m in markers for s in m["splits"].values())
    docs = sum(s["documents"] for m in markers for s in m["splits"].values())
    out = {"workers": a.workers, "pieces": len(pieces), "tokens": tokens, "documents": docs,
           "seconds": load.wall, "tokens_per_s": tokens / load.wall, "load": load.as_dict(),
           "piece_seconds": [m["seconds"] for m in markers],
           "process_rss_before_mb": rss_before / 1e6, "process_peak_rss_mb": _peak_rss() / 1e6}
    if a.workers > 1:
        out["worker_peak_rss_mb_sampled"] = sorted(round(v / 1e6, 1) for v in peaks.values())
        out["worker_low_rss_mb_sampled"] = min(lows.values()) / 1e6 if lows else None
        out["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e6
    else:  # the one worker is this process
        out["worker_peak_rss_mb"] = out["process_peak_rss_mb"]
    return out


def child_merge(a) -> dict:
    from nemo_btx.config import load_config
    from nemo_btx.data.plan import plan_data
    from nemo_btx.stages import data as stage

    cfg = load_config(_overrides(a, 1, "merge"))
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: F401

    plan = next(p for p in plan_data(cfg) if p.name == DOMAIN)
    tokenizer = stage._load_tokenizer(cfg)
    rss_before = _current_rss()
    if a.no_gc_freeze:  # what merge.py's gc.freeze() saves (add_index: gc.collect() per piece)
        import gc

        gc.freeze = gc.unfreeze = lambda: None
    _reset_peak_rss()
    with Load() as load:
        stage.merge(cfg, plan, tokenizer)
    manifest = json.loads((Path(a.run_dir) / "data" / DOMAIN / "manifest.json").read_text())
    docs = sum(s["documents"] for s in manifest["splits"].values())
    return {"seconds": load.wall, "load": load.as_dict(), "documents": docs,
            "rss_before_mb": rss_before / 1e6, "peak_rss_mb": _peak_rss() / 1e6,
            "bytes": sum(s["bin_bytes"] + s["idx_bytes"] for s in manifest["splits"].values())}


def child_reference(a) -> dict:
    """encode_batch on the documents in memory, in the stage's batches; and the readers alone."""
    from tokenizers import Tokenizer as Backend

    from nemo_btx.data import documents, readers
    from nemo_btx.data.tokenizer import Tokenizer

    chunk_bytes, buffer_bytes = _size(a.chunk_size), _size(a.buffer_size)
    with Load() as read:  # the readers alone: read + UTF-8 + JSON decode, nothing kept
        for c in readers.plan_chunks([a.source], chunk_bytes):
            for _ in readers.read_chunk(c):
                pass
    nbytes = os.path.getsize(a.source)
    docs = []  # the stage's filters: no empty document, no repeat within a chunk
    for c in readers.plan_chunks([a.source], chunk_bytes):
        seen = documents.Dedup(True)
        docs += [d for d in readers.read_chunk(c) if d.strip() and seen.is_new(d)]
    batches, batch, size = [], [], 0
    for d in docs:  # the stage's rule: flush once the buffered text reaches buffer_size characters
        batch.append(d)
        size += len(d)
        if size >= buffer_bytes:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    tok = Tokenizer(Backend.from_file(a.tokenizer), "<|endoftext|>", kind="hf")
    backend = tok._tok
    backend.encode_batch(docs[:50], add_special_tokens=False)  # warm-up
    encode_s = ids_s = encode_cpu = ids_cpu = 0.0
    tokens = 0
    with Load() as load:
        for b in batches:
            t0, c0 = time.perf_counter(), time.process_time()
            enc = backend.encode_batch(b, add_special_tokens=False)
            t1, c1 = time.perf_counter(), time.process_time()
            ids = [e.ids for e in enc]
            t2, c2 = time.perf_counter(), time.process_time()
            encode_s += t1 - t0
            ids_s += t2 - t1
            encode_cpu += c1 - c0
            ids_cpu += c2 - c1
            tokens += sum(map(len, ids))
            del enc, ids
    tokens += len(docs)  # one end-of-document id each, as the stage stores them
    return {"documents": len(docs), "batches": len(batches), "tokens": tokens,
            "encode_s": encode_s, "ids_s": ids_s, "encode_cpu_s": encode_cpu, "ids_cpu_s": ids_cpu,
            "load": load.as_dict(),
            "tokens_per_s": tokens / encode_s, "tokens_per_s_with_ids": tokens / (encode_s + ids_s),
            "read_s": read.wall, "read_mb_per_s": nbytes / 1e6 / read.wall}


def child_roundtrip(a) -> dict:
    """The same documents in every format through the whole data stage -> equal .bin/.idx."""
    from nemo_btx.config import load_config
    from nemo_btx.stages import data as stage

    out = {}
    for fmt in FORMATS:
        run_dir = Path(a.run_dir) / fmt
        cfg = load_config([f"run.dir={run_dir}", f"data.domains=[{{name: {DOMAIN}, source: '{Path(a.source) / fmt}'}}]",
                           "data.tokenizer.kind=hf", f"data.tokenizer.path={a.tokenizer}",
                           f"model.vocab_size={a.vocab}", "data.max_chars_per_domain=null",
                           "data.chunk_size=200KB", "data.workers=1",
                           "data.valid_fraction=0.2", *a.overrides])  # both splits well filled
        manifest = stage.run(cfg)
        digest = hashlib.sha256()
        for split in ("train", "valid"):
            for ext in ("bin", "idx"):
                digest.update((run_dir / "data" / DOMAIN / f"{split}.{ext}").read_bytes())
        m = manifest["domains"][DOMAIN]
        pieces = len(list((run_dir / "data" / DOMAIN / "parts").glob("*.json")))
        out[fmt] = {"sha256": digest.hexdigest(), "pieces": pieces,
                    "documents": sum(s["documents"] for s in m["splits"].values())}
    return out


def write_formats(root: Path, docs: List[str]) -> None:
    """`docs` as jsonl, jsonl.gz, jsonl.zst, parquet (several row groups) and one text file each."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    data = "".join(json.dumps({"text": d, "id": i}, ensure_ascii=i % 2 == 0) + "\n"
                   for i, d in enumerate(docs)).encode()
    for fmt in FORMATS:
        (root / fmt).mkdir(parents=True)
    (root / "jsonl" / "docs.jsonl").write_bytes(data)
    (root / "jsonl.gz" / "docs.jsonl.gz").write_bytes(gzip.compress(data))
    (root / "jsonl.zst" / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}),
                   root / "parquet" / "docs.parquet", row_group_size=64)
    for i, d in enumerate(docs):
        (root / "text" / f"doc{i:04d}.txt").write_text(d, encoding="utf-8")


# ------------------------------------------------------------------------------ the parent


def run_child(args, mode: str, **kw) -> dict:
    out = Path(args.work_dir) / f".child-{mode}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--child-out", str(out),
           "--vocab", str(args.vocab), "--chunk-size", args.chunk_size, "--buffer-size", args.buffer_size,
           "--sample", str(args.sample)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    cmd += list(args.overrides)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not out.is_file():
        sys.stderr.write(proc.stdout[-6000:])
        raise SystemExit(f"[bench] child {mode} failed (exit {proc.returncode})")
    res = json.loads(out.read_text())
    out.unlink()
    return res


def _sha(run_dir: Path) -> str:
    digest = hashlib.sha256()
    for split in ("train", "valid"):
        for ext in ("bin", "idx"):
            with open(run_dir / "data" / DOMAIN / f"{split}.{ext}", "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def wait_for_quiet(args) -> None:
    """Wait (up to --wait-quiet s) for the 1-minute load average to drop under --max-load."""
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] > args.max_load and time.monotonic() < deadline:
        print(f"[bench] load average {os.getloadavg()[0]:.2f} > {args.max_load}: waiting", flush=True)
        time.sleep(30)


def roundtrip(args, prep: dict) -> dict:
    root = Path(args.work_dir) / "formats"
    shutil.rmtree(root, ignore_errors=True)
    gen, docs, seen = iter(DocumentGenerator(args.seed + 1)), [], set()
    while len(docs) < args.roundtrip_docs:
        d = next(gen)
        if d not in seen:
            seen.add(d)
            docs.append(d)
    write_formats(root / "in", docs)
    t = time.perf_counter()
    res = run_child(args, "roundtrip", run_dir=root / "runs", source=root / "in", tokenizer=prep["tokenizer"])
    shutil.rmtree(root, ignore_errors=True)
    shas = {r["sha256"] for r in res.values()}
    return {"formats": res, "documents": len(docs), "identical": len(shas) == 1
            and all(r["documents"] == len(docs) for r in res.values()), "seconds": time.perf_counter() - t}


def stage_and_merge(args, prep_source: str, tokenizer: str, workers: int, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    common = dict(run_dir=run_dir, source=prep_source, tokenizer=tokenizer)
    res = run_child(args, "stage", workers=workers, **common)
    res["merge"] = run_child(args, "merge", **common)
    res["sha256"] = _sha(run_dir)
    # The same merge again without merge.py's gc.freeze() (see --help): time, and the same bytes?
    out = run_dir / "data" / DOMAIN
    for f in out.glob("*"):
        if f.is_file():
            f.unlink()
    res["merge_unfrozen"] = run_child(args, "merge", no_gc_freeze=1, **common)
    res["merge_unfrozen"]["same_bytes"] = _sha(run_dir) == res["sha256"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value for every stage run")
    ap.add_argument("--size", default="100MB", help="the corpus of targets 1-3")
    ap.add_argument("--large-size", default="1GB", help="the larger corpus of target 3 (generated, then deleted)")
    ap.add_argument("--no-large", action="store_true", help="skip the large corpus (target 3 not measured)")
    ap.add_argument("--chunk-size", default=DataConfig().chunk_size, help="data.chunk_size (default: the config's)")
    ap.add_argument("--buffer-size", default=DataConfig().buffer_size, help="data.buffer_size (default: the config's)")
    ap.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary (and model.vocab_size)")
    ap.add_argument("--repeats", type=int, default=1, help="repeats of reference / 1 worker / 2 workers; best kept")
    ap.add_argument("--roundtrip-docs", type=int, default=400)
    ap.add_argument("--sample", type=float, default=0.1, help="RSS sampling period of pool workers (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default="/tmp/nemo-btx-bench-data",
                    help="cached corpus and tokenizer; run directories (deleted)")
    ap.add_argument("--max-load", type=float, default=0.5,
                    help="wait for the 1-minute load average to drop below this before timing")
    ap.add_argument("--wait-quiet", type=float, default=0, help="seconds to wait at most for it (0: don't)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    # internal: one measurement in its own process
    ap.add_argument("--child", choices=("stage", "merge", "reference", "roundtrip"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--no-gc-freeze", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        res = {"stage": child_stage, "merge": child_merge, "reference": child_reference,
               "roundtrip": child_roundtrip}[args.child](args)
        Path(args.child_out).write_text(json.dumps(res, indent=2))
        return 0

    start = time.perf_counter()
    work = Path(args.work_dir)
    prep = prepare(args)
    out: dict = {"protocol": {"size": args.size, "large_size": None if args.no_large else args.large_size,
                              "chunk_size": args.chunk_size, "buffer_size": args.buffer_size,
                              "vocab_size": prep["vocab_size"], "repeats": args.repeats,
                              "overrides": args.overrides, "cpus": os.cpu_count()},
                 "corpus": {k: prep[k] for k in ("bytes", "documents")}}

    print("[bench] target 4: every format -> the same .bin/.idx", flush=True)
    out["roundtrip"] = roundtrip(args, prep)

    wait_for_quiet(args)
    refs, ones, twos = [], [], []
    for r in range(args.repeats):
        print(f"[bench] repeat {r + 1}/{args.repeats}: encode_batch reference", flush=True)
        refs.append(run_child(args, "reference", source=prep["corpus"], tokenizer=prep["tokenizer"]))
        for workers, acc in ((1, ones), (2, twos)):
            print(f"[bench] repeat {r + 1}/{args.repeats}: data stage, {workers} worker(s), {_mb(prep['bytes'])}",
                  flush=True)
            acc.append(stage_and_merge(args, prep["corpus"], prep["tokenizer"], workers, work / f"run-w{workers}"))
            shutil.rmtree(work / f"run-w{workers}", ignore_errors=True)
    ref = max(refs, key=lambda x: x["tokens_per_s"])
    one = max(ones, key=lambda x: x["tokens_per_s"])
    two = max(twos, key=lambda x: x["tokens_per_s"])
    out.update(reference=refs, one_worker=ones, two_workers=twos)
    same_tokens = ref["tokens"] == one["tokens"] == two["tokens"]
    same_bytes = len({x["sha256"] for x in ones + twos}) == 1

    large = None
    if not args.no_large:
        big = work / "large.jsonl"
        try:
            t = time.perf_counter()
            info = write_jsonl(big, _size(args.large_size), args.seed + 2)
            print(f"[bench] generated {big}: {_mb(info['bytes'])}, {info['documents']:,} documents "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
            wait_for_quiet(args)
            print(f"[bench] data stage, 2 workers, {_mb(info['bytes'])}", flush=True)
            large = stage_and_merge(args, str(big), prep["tokenizer"], 2, work / "run-large")
            large["corpus"] = info
            out["large"] = large
        finally:
            big.unlink(missing_ok=True)
            shutil.rmtree(work / "run-large", ignore_errors=True)

    # ---------------------------------------------------------------- figures
    rows = []
    r1 = one["tokens_per_s"] / ref["tokens_per_s"]
    rows.append(("1 worker vs encode_batch (tokens/s)", f"{one['tokens_per_s']:,.0f}", f"{ref['tokens_per_s']:,.0f}",
                 r1, f">= {TARGETS['one_worker']}", r1 >= TARGETS["one_worker"]))
    r2 = two["tokens_per_s"] / one["tokens_per_s"]
    rows.append(("2 workers vs 1 (tokens/s)", f"{two['tokens_per_s']:,.0f}", f"{one['tokens_per_s']:,.0f}",
                 r2, f">= {TARGETS['two_workers']}", r2 >= TARGETS["two_workers"]))
    if large:
        small_w, large_w = two["worker_peak_rss_mb"], large["worker_peak_rss_mb"]
        r3 = large_w / small_w
        rows.append((f"peak RSS/worker {_mb(large['corpus']['bytes'])} vs {_mb(prep['bytes'])} (MB)",
                     f"{large_w:,.0f}", f"{small_w:,.0f}", r3, f"<= {TARGETS['memory']}", r3 <= TARGETS["memory"]))
    rt = out["roundtrip"]
    rows.append((f"formats -> same .bin/.idx ({len(FORMATS)} formats)",
                 f"{len({r['sha256'] for r in rt['formats'].values()})} distinct", "1", None, "identical",
                 rt["identical"]))
    out["summary"] = [{"what": w, "measured": m, "reference": ref_, "ratio": r, "target": t, "met": ok}
                      for w, m, ref_, r, t, ok in rows]
    out["total_seconds"] = time.perf_counter() - start

    print()
    print(f"corpus: {_mb(prep['bytes'])} .jsonl, {prep['documents']:,} documents, {one['tokens']:,} tokens "
          f"({one['pieces']} pieces at data.chunk_size={args.chunk_size}), BPE of {prep['vocab_size']:,} ids, "
          f"data.buffer_size={args.buffer_size}; best of {args.repeats}")
    print(f"{'':44s} {'measured':>12s} {'reference':>12s} {'ratio':>7s} {'target':>10s}  result")
    for w, m, ref_, r, t, ok in rows:
        print(f"{w:44s} {m:>12s} {ref_:>12s} {'' if r is None else f'{r:7.3f}':>7s} {t:>10s}  "
              f"{'met' if ok else 'NOT met'}")
    print()
    print(f"reference: encode_batch {ref['encode_s']:.1f} s for {ref['tokens']:,} tokens in {ref['batches']} "
          f"batches; + ids to Python lists {ref['ids_s']:.1f} s -> {ref['tokens_per_s_with_ids']:,.0f} tokens/s; "
          f"1 worker / (encode_batch + ids) = {one['tokens_per_s'] / ref['tokens_per_s_with_ids']:.3f}")
    cpu1 = one["tokens"] / one["load"]["cpu_s"]
    cpu_ref = ref["tokens"] / ref["encode_cpu_s"]
    out["one_worker_cpu_ratio"] = cpu1 / cpu_ref
    print(f"per CPU-second (insensitive to other load): 1 worker {cpu1:,.0f} tokens/CPU-s, encode_batch "
          f"{cpu_ref:,.0f} tokens/CPU-s, ratio {cpu1 / cpu_ref:.3f}")
    print(f"readers alone (read + UTF-8 + JSON decode of the same file): {ref['read_mb_per_s']:.0f} MB/s "
          f"({ref['read_s']:.1f} s)")
    for label, res in (("1 worker", one), ("2 workers", two)) + ((("2 workers, large", large),) if large else ()):
        ld, m = res["load"], res["merge"]
        print(f"{label:17s}: tokenize {res['seconds']:6.1f} s ({res['tokens_per_s']:,.0f} tokens/s, pieces "
              f"{', '.join(f'{s:.0f}' for s in res['piece_seconds'][:16])} s), our CPU {ld['our_cores']:.2f} cores, "
              f"others {ld['other_cores']:.2f} cores; merge {m['seconds']:.1f} s "
              f"({res['merge_unfrozen']['seconds']:.1f} s without merge.py's gc.freeze(), "
              f"{'same' if res['merge_unfrozen']['same_bytes'] else 'DIFFERENT'} bytes)")
    print(f"tokens: stage {one['tokens']:,}, reference {ref['tokens']:,} ({'equal' if same_tokens else 'DIFFERENT'}); "
          f"merged .bin/.idx with 1 and 2 workers: {'identical' if same_bytes else 'DIFFERENT'}")
    if large:
        print(f"peak RSS per worker (getrusage, max over the pool; psutil samples every {args.sample} s): "
              f"{_mb(prep['bytes'])}: {two['worker_peak_rss_mb']:.0f} MB {two.get('worker_peak_rss_mb_sampled')}, "
              f"{_mb(large['corpus']['bytes'])}: {large['worker_peak_rss_mb']:.0f} MB "
              f"{large.get('worker_peak_rss_mb_sampled')}; a worker's first sample (what it inherits by fork: "
              f"python, torch, megatron, the tokenizer; shared copy-on-write): {two['worker_low_rss_mb_sampled']:.0f} / "
              f"{large['worker_low_rss_mb_sampled']:.0f} MB, so a worker grows by "
              f"{two['worker_peak_rss_mb'] - two['worker_low_rss_mb_sampled']:.0f} / "
              f"{large['worker_peak_rss_mb'] - large['worker_low_rss_mb_sampled']:.0f} MB "
              f"(set by data.buffer_size={args.buffer_size}); "
              f"the 1-worker process: {one['worker_peak_rss_mb']:.0f} MB "
              f"(before tokenizing {one['process_rss_before_mb']:.0f} MB)")
        for label, res in ((_mb(prep["bytes"]), two), (_mb(large["corpus"]["bytes"]), large)):
            m = res["merge"]
            grown = m["peak_rss_mb"] - m["rss_before_mb"]
            print(f"merge {label}: {m['seconds']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB "
                  f"(+{grown:.0f} MB over the process before merging = {grown * 1e6 / m['documents']:.0f} B "
                  f"per document, {m['documents']:,} documents): megatron's IndexedDatasetBuilder keeps "
                  f"the domain's index as Python lists, ~70 B per document (~{m['documents'] * 70 / 1e6:.0f} MB "
                  f"here), then finalize() turns them into arrays")
    pieces = ", ".join(f"{k} {v['pieces']} pieces" for k, v in rt["formats"].items())
    print(f"formats: {pieces}; "
          f"{rt['documents']} documents each; {'identical' if rt['identical'] else 'DIFFERENT'} .bin/.idx "
          f"(sha256 {next(iter(rt['formats'].values()))['sha256'][:16]})")
    print(f"total {out['total_seconds'] / 60:.1f} min; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
