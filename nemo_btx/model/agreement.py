"""The seed checkpoint and the run must agree before anything trains (seed.checkpoint).

An adopted seed (an imported Llama, or another run's seed) fixes the architecture and the
tokenizer: every expert starts from it, and its embedding rows mean the ids of the tokenizer it
was trained with. A run whose config or tokenizer differs would fail to load the weights days
later, or worse, load them and train on ids that mean other tokens. Checked from the files
alone (the checkpoint's marker and tokenizer), without torch, by `run`/`launch` up front and by
the seed stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


from nemo_btx.config.schema import SHAPE_FIELDS, ExperimentConfig
from nemo_btx.data.tokenizer import TOKENIZER_FILE, hf_tokenizer_file, seed_tokenizer
from nemo_btx.errors import ConfigError
from nemo_btx.run_dir import CHECKPOINT_MARKER, WEIGHTS, RunDir

#: Besides the shapes: fields that change what the weights compute.
BEHAVIOUR_FIELDS = ("rotary_base", "rope_scaling", "rope_scaling_factor", "position_embedding_type",
                    "norm_epsilon")


def seed_marker(path: Path) -> dict:
    """The marker of a weights or training checkpoint directory (or a seed stage's output)."""
    for candidate in (path / CHECKPOINT_MARKER, path / WEIGHTS / CHECKPOINT_MARKER):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise ConfigError("seed.checkpoint", str(path), f"incomplete checkpoint (no {CHECKPOINT_MARKER}; "
                      "import one with `nemo-btx import-hf`)")


def _sha(path: Path) -> str:
    """The tokenizer's identity: the hash of its canonical serialisation (a run stores the
    tokenizer it loaded re-serialised, so file bytes differ for the same tokenizer); a file the
    tokenizers library cannot read is hashed as it is."""
    try:
        from tokenizers import Tokenizer

        text = Tokenizer.from_file(str(path)).to_str().encode("utf-8")
    except Exception:  # the Rust library raises a bare Exception on a malformed file
        text = path.read_bytes()
    return hashlib.sha256(text).hexdigest()[:16]


def check_seed(cfg: ExperimentConfig) -> None:
    """Architecture and tokenizer of seed.checkpoint against the run's; one line naming both."""
    if cfg.seed.checkpoint is None:
        return
    path = Path(cfg.seed.checkpoint).expanduser()
    saved = seed_marker(path).get("model") or {}
    want = cfg.model
    for name in (*SHAPE_FIELDS, *BEHAVIOUR_FIELDS):
        if name in saved and saved[name] != getattr(want, name):
            raise ConfigError(f"model.{name}", getattr(want, name),
                              f"the seed {path} has {name}={saved[name]!r}; the run must use the "
                              f"seed's architecture (model.{name}={saved[name]!r})")
    theirs = seed_tokenizer(path)
    tok = cfg.data.tokenizer
    if theirs is None:
        if tok.kind == "hf":
            hf_tokenizer_file(tok.path, cfg.seed.checkpoint)  # a given path must exist; null fails here
        return  # a seed without a known tokenizer: the vocabulary check above is all we have
    if tok.kind != "hf":
        # A BPE this run already has (trained, or copied from the seed's run) is checked like a
        # given file; one still to be trained would give ids the seed never saw.
        ours = RunDir.of(cfg).tokenizer / TOKENIZER_FILE
        if not ours.is_file():
            raise ConfigError("data.tokenizer.kind", tok.kind,
                              f"a new BPE would give ids the seed never saw; use the seed's tokenizer: "
                              f"data.tokenizer.kind=hf (its path null: the seed's, {theirs.parent})")
    else:
        ours = hf_tokenizer_file(tok.path, cfg.seed.checkpoint)
    mine, seeds = _sha(ours), _sha(theirs)
    if mine != seeds:
        key, value = ("data.tokenizer.path", tok.path) if tok.kind == "hf" else ("data.tokenizer.kind", tok.kind)
        raise ConfigError(key, value, f"{ours} (sha256 {mine}) is not the seed's tokenizer {theirs} "
                                      f"(sha256 {seeds})")
