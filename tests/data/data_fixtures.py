"""Helpers and fixtures for the data tests: small caps so the directory runs in well under a minute.

Not a conftest.py: the suite's modules import the top-level `conftest` by name, and a second
conftest module would shadow it.
"""

import json
import random
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

from nemo_btx.config import load_config

# valid_fraction=0.25: the split is a hash per document, and the wiki domain capped at 200,000
# characters is 7 long articles, of which none is held out at the default 0.05 (3 at 0.25).
SMALL = ["data.max_chars_per_domain=200000", "data.valid_fraction=0.25", "model.vocab_size=512",
         "model.seq_length=64", "train.global_batch_size=8", "train.micro_batch_size=4",
         "train.train_iters=50"]
GSM8K_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test.jsonl"


def small_config(run_dir, *extra):
    """The tiny default with small data caps, in `run_dir`."""
    return load_config([f"run.dir={run_dir}", *SMALL, *extra])


_BUILT = {}


@pytest.fixture(scope="session")
def built_run(tmp_path_factory):
    """(cfg, run_dir, manifest) of a data stage run on the three builtin domains (small caps).

    Built once per session even though several modules import the fixture.
    """
    if not _BUILT:
        from nemo_btx.stages import data

        run_dir = tmp_path_factory.mktemp("built") / "run"
        cfg = small_config(run_dir)
        _BUILT["run"] = (cfg, run_dir, data.run(cfg))
    return _BUILT["run"]


# ------------------------------------------------------------------------------ expected splits

def split(docs: Sequence[str], cfg, domain: str) -> Dict[str, List[str]]:
    """What a domain's datasets must hold, from its documents in reading order: blank documents
    and exact repeats dropped, then each document on the side `documents.held_out` gives it."""
    from nemo_btx.data.documents import held_out

    d = cfg.data
    out = {"train": [], "valid": []}
    for doc in dict.fromkeys(x for x in docs if x.strip()):
        side = "valid" if held_out(doc, seed=d.seed, domain=domain, fraction=d.valid_fraction) else "train"
        out[side].append(doc)
    return out


def expected_splits(cfg, name: str) -> Dict[str, List[str]]:
    """`split` of a capped or builtin domain, which is one piece: read in order, deduplicated whole."""
    from nemo_btx.data import corpora

    src = next(s for s in corpora.resolve_sources(cfg.data) if s.name == name)
    return split(corpora.read_documents(src, cfg.data), cfg, name)


def dataset_texts(prefix: str, tok) -> List[str]:
    """Every document of a .bin/.idx decoded, each checked to end with (only) one end-of-document."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if Path(f"{prefix}.bin").stat().st_size == 0:  # a piece with no document on this side
        return []
    ds = IndexedDataset(str(prefix))
    out = []
    for i in range(len(ds)):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
        out.append(tok.decode(ids[:-1]))
    return out


# ------------------------------------------------------------------------------ user corpora

_WORDS = ("alpha beta gamma delta epsilon river stone cloud number seven forty apple market "
          "north quiet signal paper window Zürich Łódź 東京 naïve café 🙂 data model train").split()


def make_documents(n: int, seed: int = 0, min_words: int = 8, max_words: int = 60) -> List[str]:
    """`n` distinct documents of random words (some non-ASCII, some multi-line), no '\\r'."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
        if i % 5 == 0:
            words.insert(len(words) // 2, "\n")
        out.append(f"Document {i}: " + " ".join(words).replace(" \n ", "\n"))
    return out


def write_jsonl(path: Path, docs: Sequence[str], key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    return path


def hf_tokenizer(directory: Path, docs: Sequence[str], vocab_size: int = 512) -> Path:
    """A BPE trained on `docs`, saved as a Hugging Face tokenizer.json in `directory`: a fixed
    tokenizer (data.tokenizer.kind=hf) so that builds compare without retraining one."""
    from nemo_btx.data.tokenizer import train_bpe

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(train_bpe(list(docs), vocab_size).to_str())
    return directory


def user_config(run_dir, domains: str, *extra, tokenizer_dir=None):
    """A config for user corpora cut into many pieces: no character cap, 2 KB chunks, one worker."""
    tok = [] if tokenizer_dir is None else ["data.tokenizer.kind=hf", f"data.tokenizer.path={tokenizer_dir}"]
    return small_config(run_dir, "data.max_chars_per_domain=null", "data.chunk_size=2KB", "data.workers=1",
                        f"data.domains={domains}", *tok, *extra)


def data_files(run_dir, domain: str) -> Dict[str, bytes]:
    """The bytes of a domain's train/valid .bin/.idx, by file name."""
    root = Path(run_dir) / "data" / domain
    return {f"{s}.{e}": (root / f"{s}.{e}").read_bytes() for s in ("train", "valid") for e in ("bin", "idx")}


def without_timing(manifest: dict) -> dict:
    """A manifest without the fields that measure time (equal builds differ only in those)."""
    return {k: v for k, v in manifest.items() if k != "seconds"}
