"""The tokenizer round-trips any text, trains deterministically and must fit the model."""

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
