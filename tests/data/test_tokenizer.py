"""The tokenizer round-trips any text, trains deterministically and must fit the model."""

import json
import subprocess
import sys

import pytest

from nemo_btx.config import load_config
from nemo_btx.data import tokenizer as T
from nemo_btx.errors import ConfigError

from data_fixtures import built_run, small_config  # noqa: F401 - built_run is a fixture

SAMPLES = [
    "def f(x):\n\treturn x ** 2  # square\n",
    "Question: Amara has 12 apples.\nAnswer: 12 / 3 = 4.\n#### 4",
    "Zürich, Łódź, 東京, Ελληνικά, emoji 🙂 and a\u00a0no-break space.",
    "   leading spaces and trailing   \n\n",
    "a literal <|endoftext|> inside a document is text",
]


@pytest.fixture(scope="module")
def corpus():
    from nemo_btx.data import corpora

    cfg = small_config("unused")
    out = []
    for src in corpora.resolve_sources(cfg.data):
        out += corpora.read_documents(src, cfg.data)[:40]
    return out


def test_round_trip_and_eod(built_run):
    _, run_dir, manifest = built_run
    tok = T.load_tokenizer(run_dir)
    assert tok.vocab_size == manifest["tokenizer"]["vocab_size"] <= 512
    assert tok.decode([tok.eod_id]) == T.BPE_EOD
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eod_id not in ids  # documents never contain a boundary
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_training_is_deterministic(corpus):
    a = T.train_bpe(corpus, 512)
    b = T.train_bpe(list(corpus), 512)
    assert a.sha256 == b.sha256 and a.vocab_size == 512


def test_training_is_deterministic_across_processes(tmp_path, corpus):
    """Hash-map order differs between processes; the merges must not depend on it."""
    texts = tmp_path / "texts.txt"
    texts.write_text("\x00".join(corpus))
    code = ("import sys; from nemo_btx.data.tokenizer import train_bpe; "
            "docs = open(sys.argv[1]).read().split('\\x00'); print(train_bpe(docs, 512).sha256)")
    outs = {subprocess.run([sys.executable, "-c", code, str(texts)], capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(2)}
    assert outs == {T.train_bpe(corpus, 512).sha256}


def test_vocab_larger_than_model_is_an_error(corpus):
    tok = T.train_bpe(corpus, 600)
    cfg = load_config(["model.vocab_size=512"])
    with pytest.raises(ConfigError) as err:
        T.check_vocab(tok, cfg.model)
    assert err.value.key == "model.vocab_size" and "600" in str(err.value) and "512" in str(err.value)
    with pytest.raises(ConfigError, match="at least 257"):
        T.train_bpe(corpus, 200)


def test_hf_tokenizer_is_loaded_and_copied(tmp_path, corpus):
    from nemo_btx.stages import data

    source = T.train_bpe(corpus, 400)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text(source.to_str())
    run_dir = tmp_path / "run"
    cfg = small_config(run_dir, "data.tokenizer.kind=hf", f"data.tokenizer.path={hf}",
                       "data.domains=[{name: math}]")
    manifest = data.run(cfg)
    copied = T.load_tokenizer(run_dir)
    assert copied.sha256 == source.sha256 == manifest["tokenizer"]["sha256"]
    assert copied.kind == "hf" and copied.eod_token == T.BPE_EOD

    cfg = small_config(tmp_path / "run2", "data.tokenizer.kind=hf", f"data.tokenizer.path={hf}",
                       "data.tokenizer.eod_token='</s>'")
    with pytest.raises(ConfigError) as err:
        T.make_tokenizer(cfg, [])
    assert err.value.key == "data.tokenizer.eod_token"


# ------------------------------------------------------------------ BOS and EOS as the seed had them

def _hf(path, **fields):
    from nemo_btx.config.schema import TokenizerConfig

    return T.load_hf(TokenizerConfig(kind="hf", path=str(path), **fields))


def test_bpe_has_no_bos(built_run):
    """The tiny default: documents are text + <|endoftext|>, as before BOS was a convention."""
    cfg, run_dir, _ = built_run
    tok = T.load_tokenizer(run_dir)
    assert tok.bos_id is None and T.tokenizer_meta(run_dir)["bos_token"] is None
    assert tok.encode_documents(SAMPLES) == [tok.encode(t) + [tok.eod_id] for t in SAMPLES]
    cfg = small_config(run_dir, "data.tokenizer.add_bos=true")
    with pytest.raises(ConfigError) as err:
        T.make_tokenizer(cfg, [])
    assert err.value.key == "data.tokenizer.add_bos"


def test_llama3_style_documents_are_what_transformers_encodes(tmp_path):
    """BOS from the post-processor, EOS from tokenizer_config.json: a document is the ids
    transformers gives its text (BOS included) followed by the EOS."""
    from transformers import AutoTokenizer

    from hf_tokenizers import LLAMA3_BOS, LLAMA3_EOS, write_llama3_tokenizer

    hf_dir = write_llama3_tokenizer(tmp_path / "hf")
    tok = _hf(hf_dir)
    assert (tok.bos_token, tok.eod_token) == (LLAMA3_BOS, LLAMA3_EOS)
    assert tok.bos_source == "tokenizer.json post-processor"
    theirs = AutoTokenizer.from_pretrained(str(hf_dir))
    plain = [t for t in SAMPLES if "<|" not in t]  # transformers matches special tokens in text
    docs = tok.encode_documents(plain)
    for text, ids in zip(plain, docs):
        assert ids[0] == theirs.bos_token_id and ids[-1] == theirs.eos_token_id
        assert ids[:-1] == theirs(text).input_ids
    literal = tok.encode_documents([f"a {LLAMA3_BOS} in a document is text"])[0]
    assert literal.count(tok.bos_id) == 1

    T.save_tokenizer(tok, tmp_path / "run")
    meta = T.tokenizer_meta(tmp_path / "run")
    assert (meta["bos_token"], meta["bos_id"], meta["bos_source"]) == (LLAMA3_BOS, tok.bos_id, tok.bos_source)
    back = T.load_tokenizer(tmp_path / "run")
    assert (back.bos_id, back.eod_id, back.sha256) == (tok.bos_id, tok.eod_id, tok.sha256)
    assert back.encode_documents(plain) == docs

    # a meta.json from before BOS was recorded: its datasets were built without one
    for key in ("bos_token", "bos_id", "bos_source"):
        del meta[key]
    (tmp_path / "run" / "tokenizer" / "meta.json").write_text(json.dumps(meta))
    assert T.load_tokenizer(tmp_path / "run").bos_id is None


def test_add_bos_overrides_the_tokenizer(tmp_path):
    from hf_tokenizers import LLAMA3_BOS, QWEN_EOS, write_llama3_tokenizer, write_qwen_tokenizer

    llama, qwen = write_llama3_tokenizer(tmp_path / "llama"), write_qwen_tokenizer(tmp_path / "qwen")
    with_bos, without = _hf(llama), _hf(llama, add_bos=False)
    assert without.bos_id is None and without.bos_source == "data.tokenizer.add_bos"
    assert without.encode_documents(["x y"]) == [with_bos.encode_documents(["x y"])[0][1:]]
    assert without.sha256 != with_bos.sha256  # datasets built with the other convention are stale

    plain = _hf(qwen)  # no BOS anywhere; its EOS is named, ahead of the <|endoftext|> candidate
    assert plain.bos_id is None and plain.eod_token == QWEN_EOS
    assert plain.encode_documents(["x y"]) == [plain.encode("x y") + [plain.eod_id]]
    with pytest.raises(ConfigError) as err:
        _hf(qwen, add_bos=True)
    assert err.value.key == "data.tokenizer.add_bos"

    # tokenizer_config.json's add_bos_token decides before the post-processor does
    off = _hf(write_llama3_tokenizer(tmp_path / "off", add_bos_token=False))
    assert off.bos_id is None and off.bos_source == "tokenizer_config.json add_bos_token"
    on = _hf(write_qwen_tokenizer(tmp_path / "on", add_bos_token=True, bos_token="<|im_start|>"))
    assert on.bos_token == "<|im_start|>" and on.encode_documents(["x"])[0][0] == on.bos_id
    assert _hf(llama, add_bos=True).bos_token == LLAMA3_BOS


def test_a_seed_run_tokenizer_keeps_its_recorded_bos(tmp_path):
    """A seed trained in another run left tokenizer.json + meta.json, no tokenizer_config.json:
    a run on that tokenizer takes the conventions meta.json recorded, not the post-processor's."""
    from hf_tokenizers import write_llama3_tokenizer, write_qwen_tokenizer

    qwen = write_qwen_tokenizer(tmp_path / "qwen", bos_token="<|im_start|>")
    assert _hf(qwen).bos_id is None  # named, but added neither by its config nor by its post-processor
    forced = _hf(qwen, add_bos=True, eod_token="<|endoftext|>")
    T.save_tokenizer(forced, tmp_path / "a")
    again = _hf(tmp_path / "a" / "tokenizer")
    assert (again.bos_id, again.eod_id, again.sha256) == (forced.bos_id, forced.eod_id, forced.sha256)
    assert again.bos_source == "meta.json add_bos_token"

    T.save_tokenizer(_hf(write_llama3_tokenizer(tmp_path / "llama")), tmp_path / "b")
    meta_file = tmp_path / "b" / "tokenizer" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert _hf(meta_file.parent).bos_id == meta["bos_id"] is not None
    del meta["bos_token"]  # recorded before BOS was: that seed was trained without one
    meta_file.write_text(json.dumps(meta))
    assert _hf(meta_file.parent).bos_id is None


def test_data_stage_stores_the_bos(tmp_path):
    """The built datasets hold BOS + text + EOS per document, and the tokenizer they record."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from hf_tokenizers import write_llama3_tokenizer
    from nemo_btx.data.indexed import dataset_prefix
    from nemo_btx.stages import data

    hf_dir = write_llama3_tokenizer(tmp_path / "hf")
    run_dir = tmp_path / "run"
    cfg = small_config(run_dir, "data.tokenizer.kind=hf", f"data.tokenizer.path={hf_dir}",
                       "data.domains=[{name: math}]")
    manifest = data.run(cfg)
    tok = T.load_tokenizer(run_dir)
    assert manifest["tokenizer"]["sha256"] == tok.sha256 == _hf(hf_dir).sha256
    ds = IndexedDataset(dataset_prefix(run_dir, "math", "train"))
    assert len(ds) > 3
    for i in range(len(ds)):
        ids = ds[i].tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eod_id and tok.bos_id not in ids[1:]
