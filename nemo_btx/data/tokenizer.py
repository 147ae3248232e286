"""The run's tokenizer: a byte-level BPE trained on the domains, or a Hugging Face tokenizer.json.

Every stage that turns text into ids (data, evaluation, export) loads the one copy saved at
``<run.dir>/tokenizer/tokenizer.json``, so the ids in the datasets, the model's embedding and the
evaluation prompts always agree. The tiny default trains its own (`kind=bpe`): no hub is
reachable, and a vocabulary fitted to the three domains keeps sequences short. A real recipe
loads the seed model's (`kind=hf`, e.g. Llama-2's `tokenizer.json`), because the seed's embedding
rows are indexed by it.

Byte-level BPE never meets an unknown character, so decode(encode(text)) == text for any text;
that is what lets the tests check the datasets token for token. Training is deterministic: the
initial alphabet is the 256 byte symbols in a fixed order and merges are ranked by count, ties
by symbol ids, which do not depend on hash order.

A document is stored as the tokenizer's own conventions have it, so that an imported seed sees
its tokens as it saw them in pre-training: its BOS first when the tokenizer adds one (`bos_id`;
Llama: yes, Qwen and GPT-2 style: no, our BPE: never), then the text, then one end-of-document
id (`eod_id`; a Hugging Face tokenizer's own EOS when its tokenizer_config.json names one). The
text of a document is encoded with special-token matching switched off, so a literal
"<|endoftext|>" inside a document is ordinary text and never a document boundary.
"""

from __future__ import annotations

import hashlib
import logging
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from nemo_btx.artifacts import make_tmp_dir, read_json, write_json_atomic
from nemo_btx.config.schema import ExperimentConfig, ModelConfig, TokenizerConfig
from nemo_btx.errors import BtxError, ConfigError
from nemo_btx.run_dir import RunDir

log = logging.getLogger(__name__)

BPE_EOD = "<|endoftext|>"
#: End-of-document candidates tried in order for a kind=hf tokenizer without data.tokenizer.eod_token.
HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
TOKENIZER_FILE = "tokenizer.json"
#: Hugging Face's settings beside a tokenizer.json: which tokens are BOS/EOS, whether BOS is added.
HF_CONFIG_FILE = "tokenizer_config.json"
META_FILE = "meta.json"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its document conventions (BOS, end-of-document): the only
    tokenizer API stages use.

    Args:
        bos_token: put before every document (and evaluation request); None = no BOS.
        bos_source: what decided `bos_token` (recorded in meta.json).
    """

    def __init__(self, backend, eod_token: str, kind: str = "bpe", *,
                 bos_token: Optional[str] = None, bos_source: str = "none"):
        ids = backend.token_to_id(eod_token)
        if ids is None:
            raise BtxError(f"the tokenizer has no end-of-document token {eod_token!r}")
        bos_id = None if bos_token is None else backend.token_to_id(bos_token)
        if bos_token is not None and bos_id is None:
            raise BtxError(f"the tokenizer has no BOS token {bos_token!r}")
        self._tok = backend
        # Documents are raw text: special tokens written inside them must not be matched.
        self._tok.encode_special_tokens = True
        self.eod_token = eod_token
        self.eod_id: int = ids
        self.bos_token = bos_token
        self.bos_id: Optional[int] = bos_id
        self.bos_source = bos_source
        self.kind = kind

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added/special tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        """Ids of `text` alone: no BOS, no end-of-document id, no post-processor template."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """`encode` over many documents at once (parallel in the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_documents(self, texts: List[str]) -> List[List[int]]:
        """The ids each document is stored as in a dataset: BOS (if the tokenizer has one), its
        text, then the end-of-document id. The one place where the encoding of a document is
        decided (data building for every domain and worker goes through it)."""
        out = self.encode_batch(texts)
        for ids in out:
            if self.bos_id is not None:
                ids.insert(0, self.bos_id)
            ids.append(self.eod_id)
        return out

    @property
    def dataset_dtype(self):
        """The .bin dtype megatron-core picks for this vocabulary (uint16 below 65,500 ids)."""
        from megatron.core.datasets.indexed_dataset import DType

        return DType.optimal_dtype(self.vocab_size)

    def decode(self, ids: List[int]) -> str:
        """Text of `ids`; special tokens (such as the end-of-document token) are kept as text."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def sha256(self) -> str:
        """Hash of the serialised tokenizer and of the BOS convention (when there is a BOS):
        data manifests record it to detect datasets built with another encoding."""
        text = self.to_str()
        if self.bos_token is not None:
            text += f"\0bos={self.bos_token}"  # the same vocabulary with a BOS encodes differently
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def train_bpe(texts: Iterable[str], vocab_size: int, *, length: Optional[int] = None) -> Tokenizer:
    """A byte-level BPE with at most `vocab_size` ids (256 bytes + <|endoftext|> + merges)."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ConfigError("model.vocab_size", vocab_size,
                          "a byte-level BPE needs at least 257 ids (256 bytes + end-of-document)")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_EOD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(backend, BPE_EOD, kind="bpe", bos_source="kind=bpe")


def seed_tokenizer(checkpoint) -> Optional[Path]:
    """The tokenizer.json a seed checkpoint was trained with: the one `import-hf` copied beside
    it, or the run's own when the checkpoint lives in a run directory; None if neither."""
    from nemo_btx.run_dir import checkpoint_tokenizer, find_run_dir

    own = checkpoint_tokenizer(checkpoint) / TOKENIZER_FILE
    if own.is_file():
        return own
    run = find_run_dir(checkpoint)
    if run is not None and (RunDir(run).tokenizer / TOKENIZER_FILE).is_file():
        return RunDir(run).tokenizer / TOKENIZER_FILE
    return None


def hf_tokenizer_file(path: Optional[str], seed: Optional[str] = None) -> Path:
    """data.tokenizer.path as a tokenizer.json file; null = the seed checkpoint's tokenizer."""
    if not path and seed:
        found = seed_tokenizer(Path(seed).expanduser())
        if found is None:
            raise ConfigError("data.tokenizer.path", path, f"null takes the seed's tokenizer, but "
                              f"seed.checkpoint={seed} carries none: give its tokenizer.json")
        return found
    if not path:
        raise ConfigError("data.tokenizer.path", path, "kind=hf needs the path of a tokenizer.json "
                          "file or of a directory holding one (or seed.checkpoint: its tokenizer)")
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise ConfigError("data.tokenizer.path", path, f"no tokenizer.json at {p}")
    return p


def hf_tokenizer_config(path: Path) -> Tuple[dict, str]:
    """(settings, the file they come from) beside a tokenizer.json: its tokenizer_config.json;
    for a run's saved tokenizer (a seed trained in another run), the conventions its meta.json
    recorded, so that the seed's data and ours agree (a meta.json without them: no BOS);
    ({}, "") when there is neither."""
    cfg_file = Path(path).with_name(HF_CONFIG_FILE)
    if cfg_file.is_file():
        try:
            return json.loads(cfg_file.read_text(encoding="utf-8")), HF_CONFIG_FILE
        except ValueError as err:
            raise ConfigError("data.tokenizer.path", str(path), f"{cfg_file} is not JSON: {err}") from None
    meta_file = Path(path).with_name(META_FILE)
    if meta_file.is_file():
        meta = read_json(meta_file)
        return {"add_bos_token": meta.get("bos_token") is not None, "bos_token": meta.get("bos_token"),
                "eos_token": meta.get("eod_token")}, META_FILE
    return {}, ""


def _token_text(value) -> Optional[str]:
    """A token as tokenizer_config.json writes it: a string, or {"content": ...} (older files)."""
    return value.get("content") if isinstance(value, dict) else value


def template_bos(backend) -> Optional[str]:
    """The special token the tokenizer.json post-processor puts first when special tokens are
    added (Llama-3's TemplateProcessing: <|begin_of_text|>), or None."""
    plain = backend.encode("a", add_special_tokens=False)
    full = backend.encode("a", add_special_tokens=True)
    if len(full.ids) > len(plain.ids) and full.special_tokens_mask[0] == 1:
        return backend.id_to_token(full.ids[0])
    return None


def hf_bos(backend, config: dict, add_bos: Optional[bool], where: str = HF_CONFIG_FILE
           ) -> Tuple[Optional[str], str]:
    """(BOS token or None, what decided it) for a Hugging Face tokenizer.

    The order: data.tokenizer.add_bos, else `config`'s add_bos_token (tokenizer_config.json: the
    tokenizer classes of Llama-2, Mistral and Gemma honour it; `where` names the file), else what
    the post-processor does (Llama-3 declares its BOS only there).
    """
    named = _token_text(config.get("bos_token"))
    named = named if named and backend.token_to_id(named) is not None else None
    template = template_bos(backend)
    if add_bos is False:
        return None, "data.tokenizer.add_bos"
    if add_bos:
        if named or template:
            return named or template, "data.tokenizer.add_bos"
        raise ConfigError("data.tokenizer.add_bos", add_bos, "the tokenizer has no BOS token "
                          "(none named beside it and its post-processor adds none)")
    if "add_bos_token" in config:
        if not config["add_bos_token"]:
            if template:
                log.warning("%s: add_bos_token=false although the post-processor adds %s; following "
                        "%s (set data.tokenizer.add_bos to choose)", where, template, where)
            return None, f"{where} add_bos_token"
        if not (named or template):
            raise ConfigError("data.tokenizer.add_bos", add_bos, f"{where} sets add_bos_token but "
                              "names no BOS token the vocabulary has; set data.tokenizer.add_bos=false")
        return named or template, f"{where} add_bos_token"
    if template:
        return template, "tokenizer.json post-processor"
    return None, "tokenizer.json post-processor"


def load_hf(tcfg: TokenizerConfig, seed: Optional[str] = None) -> Tokenizer:
    """A Hugging Face `tokenizer.json` (any model type) with its own BOS and EOS conventions."""
    from tokenizers import Tokenizer as Backend

    path = hf_tokenizer_file(tcfg.path, seed)
    try:
        backend = Backend.from_file(str(path))
    except Exception as err:  # the Rust library raises a bare Exception on a malformed file
        raise ConfigError("data.tokenizer.path", tcfg.path, f"not a Hugging Face tokenizer.json: {err}") from None
    config, where = hf_tokenizer_config(path)
    bos, source = hf_bos(backend, config, tcfg.add_bos, where)
    eos = _token_text(config.get("eos_token"))
    if tcfg.eod_token is not None:
        if backend.token_to_id(tcfg.eod_token) is None:
            raise ConfigError("data.tokenizer.eod_token", tcfg.eod_token, f"{path} has no such token")
        eod = tcfg.eod_token
    elif eos and backend.token_to_id(eos) is not None:
        eod = eos  # what the seed ended its documents with
    else:
        eod = next((c for c in HF_EOD_CANDIDATES if backend.token_to_id(c) is not None), None)
        if eod is None:
            raise ConfigError("data.tokenizer.eod_token", None, f"{path} has none of "
                              f"{', '.join(HF_EOD_CANDIDATES)}; name its end-of-document token")
    tok = Tokenizer(backend, eod, kind="hf", bos_token=bos, bos_source=source)
    log.info("tokenizer %s: BOS %s (%s), end-of-document %s", path, bos, source, eod)
    return tok


def check_vocab(tokenizer: Tokenizer, model: ModelConfig) -> None:
    """The model's embedding must have a row for every id the tokenizer can produce."""
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError("model.vocab_size", model.vocab_size,
                          f"the tokenizer has {tokenizer.vocab_size} tokens, more than "
                          f"model.vocab_size={model.vocab_size}; set model.vocab_size to at least "
                          f"{tokenizer.vocab_size}")


def make_tokenizer(cfg: ExperimentConfig, train_texts: Iterable[str], *, length: Optional[int] = None) -> Tokenizer:
    """The configured tokenizer, in memory: trained on `train_texts` (bpe) or loaded (hf)."""
    tcfg = cfg.data.tokenizer
    if tcfg.kind == "hf":
        tok = load_hf(tcfg, cfg.seed.checkpoint)
    else:
        if tcfg.eod_token not in (None, BPE_EOD):
            raise ConfigError("data.tokenizer.eod_token", tcfg.eod_token,
                              f"kind=bpe always uses {BPE_EOD}; leave it null")
        if tcfg.add_bos:
            raise ConfigError("data.tokenizer.add_bos", tcfg.add_bos,
                              "kind=bpe has no BOS token; leave it null or false")
        tok = train_bpe(train_texts, cfg.model.vocab_size, length=length)
    check_vocab(tok, cfg.model)
    return tok


def tokenizer_dir(run_dir) -> Path:
    return RunDir(run_dir).tokenizer


def save_tokenizer(tokenizer: Tokenizer, run_dir, fingerprint: Optional[dict] = None) -> Path:
    """Write `<run_dir>/tokenizer/` (tokenizer.json + meta.json) atomically; return its path.

    The directory is assembled under a temporary name and renamed into place, so a reader sees
    the old tokenizer or the new one, never half of one.
    """
    final = tokenizer_dir(run_dir)
    tmp = make_tmp_dir(final.parent, f".{final.name}.")
    try:
        text = tokenizer.to_str()
        (tmp / TOKENIZER_FILE).write_text(text, encoding="utf-8")
        write_json_atomic(tmp / META_FILE, {
            "kind": tokenizer.kind, "eod_token": tokenizer.eod_token, "eod_id": tokenizer.eod_id,
            "bos_token": tokenizer.bos_token, "bos_id": tokenizer.bos_id, "bos_source": tokenizer.bos_source,
            "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256,
            "fingerprint": fingerprint})
        if final.exists():
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def tokenizer_meta(run_dir) -> Optional[dict]:
    """The saved tokenizer's meta.json (sha256, vocabulary, fingerprint), or None."""
    try:
        return read_json(tokenizer_dir(run_dir) / META_FILE)
    except (OSError, ValueError):
        return None


def load_tokenizer(run_dir) -> Tokenizer:
    """The tokenizer a data stage saved in `<run_dir>/tokenizer/`."""
    from tokenizers import Tokenizer as Backend

    d = tokenizer_dir(run_dir)
    if not (d / META_FILE).is_file() or not (d / TOKENIZER_FILE).is_file():
        raise BtxError(f"no tokenizer in {d}: run the data stage first (nemo-btx data run.dir={run_dir})")
    meta = read_json(d / META_FILE)
    # meta.json written before BOS was recorded: those datasets were built without one
    tok = Tokenizer(Backend.from_file(str(d / TOKENIZER_FILE)), meta["eod_token"], kind=meta["kind"],
                    bos_token=meta.get("bos_token"), bos_source=meta.get("bos_source", "none"))
    if tok.eod_id != meta["eod_id"] or tok.bos_id != meta.get("bos_id"):
        raise BtxError(f"{d}: the BOS or end-of-document id in meta.json does not match tokenizer.json")
    return tok
