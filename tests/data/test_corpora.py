"""The builtin corpora are real, deterministic, clean and uncontaminated; user sources work."""

import gzip
import json
import re

import pytest

from nemo_btx.data import arithmetic, corpora, documents
from nemo_btx.errors import BtxError, ConfigError

from data_fixtures import GSM8K_TEST, small_config


def _docs(cfg, name):
    src = next(s for s in corpora.resolve_sources(cfg.data) if s.name == name)
    return corpora.read_documents(src, cfg.data)


@pytest.mark.parametrize("name", corpora.BUILTIN)
def test_builtin_corpus_is_nonempty_capped_and_deterministic(tmp_path, name):
    cfg = small_config(tmp_path)
    first, second = _docs(cfg, name), _docs(cfg, name)
    assert first == second
    assert len(first) >= 2 and all(d.strip() for d in first)
    assert sum(map(len, first)) <= cfg.data.max_chars_per_domain
    # Exact repeats are dropped when the domain (one piece) is tokenized, not by the stream.
    dedup = documents.Dedup(True)
    kept = [d for d in first if dedup.is_new(d)]
    assert kept == list(dict.fromkeys(first)) and dedup.dropped == len(first) - len(kept)


def test_data_seed_changes_the_order(tmp_path):
    a = _docs(small_config(tmp_path), "math")
    b = _docs(small_config(tmp_path, "data.seed=7"), "math")
    assert a != b


def test_code_is_stdlib_source_without_tests():
    files = corpora.stdlib_files(1234)
    assert len(files) > 300
    for path in files:
        assert path.suffix == ".py"
        assert not {"test", "tests", "idle_test", "site-packages"}.intersection(path.parts)
        assert not path.name.startswith("_sysconfigdata")


def test_math_documents_carry_worked_answers(tmp_path):
    docs = _docs(small_config(tmp_path), "math")
    kinds = set()
    for doc in docs[:-1]:  # the last one may be cut by the character budget
        question, _, answer = doc.partition("\nAnswer: ")
        assert question.startswith("Question: ") and answer
        assert re.search(r"\n#### \S+$", answer)
        assert "=" in answer  # the arithmetic is written out, not only the result
        kinds.add(question.split()[1])
    assert len(kinds) > 10


def test_math_expressions_evaluate_to_their_answers():
    import random

    rng = random.Random(0)
    for _ in range(500):
        question, steps, answer = arithmetic.expression(rng)
        assert eval(question[len("Calculate "):-1]) == int(answer)  # noqa: S307 - generated digits and + - *


def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def test_math_contains_no_gsm8k_test_question():
    if not GSM8K_TEST.is_file():
        pytest.skip(f"{GSM8K_TEST} not present")
    questions = [json.loads(line)["question"] for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    assert len(questions) > 1000
    n = 13  # the usual decontamination n-gram length
    grams = set()
    for q in questions:
        w = _words(q)
        grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    normalised = {" ".join(_words(q)) for q in questions}
    for doc in arithmetic.problems(1234, 20_000):
        w = _words(doc)
        assert " ".join(_words(doc.split("\nAnswer:")[0][len("Question: "):])) not in normalised
        assert not any(tuple(w[i:i + n]) in grams for i in range(len(w) - n + 1)), doc


def test_wiki_is_plain_text():
    articles = corpora.wiki_articles()
    assert len(articles) >= 100
    text = "\n".join(articles)
    for mark in ("[[", "]]", "{{", "}}", "<ref", "</ref", "'''", "''", "\n==", "{|", "|}"):
        assert mark not in text, mark
    assert any(a.startswith("Anarchism\n\n") for a in articles)


def test_user_jsonl_text_and_glob_sources(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"document {i}", "id": i}) for i in range(5)) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "zipped"}) + "\n")
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"{i}.txt").write_text(f"text file {i}\nsecond line")
    cfg = small_config(tmp_path, f"data.domains=[{{name: j, source: '{tmp_path}/*.jsonl*', text_key: body}},"
                                 f"{{name: t, source: '{texts}'}}]")
    j, t = corpora.resolve_sources(cfg.data)
    assert corpora.read_documents(j, cfg.data) == [f"document {i}" for i in range(5)] + ["zipped"]
    assert corpora.read_documents(t, cfg.data) == [f"text file {i}\nsecond line" for i in range(3)]


def test_max_documents_caps_a_domain(tmp_path):
    cfg = small_config(tmp_path, "data.domains=[{name: math, max_documents: 7}]")
    assert len(_docs(cfg, "math")) == 7


@pytest.mark.parametrize("domains, key, words", [
    ("[{name: x, source: /no/such/file.jsonl}]", "data.domains.0.source", "no such file"),
    ("[{name: code}, {name: x, source: '/no/such/*.txt'}]", "data.domains.1.source", "no such file"),
    ("[{name: poetry}]", "data.domains.0.source", "no builtin corpus named 'poetry'"),
    ("[{name: code}, {name: code}]", "data.domains.1.name", "unique"),
    ("[{name: '../up'}]", "data.domains.0.name", "directory name"),
])
def test_bad_source_names_its_key(tmp_path, domains, key, words):
    cfg = small_config(tmp_path, f"data.domains={domains}")
    with pytest.raises(ConfigError) as err:
        corpora.resolve_sources(cfg.data)
    assert err.value.key == key and words in str(err.value)


def test_empty_file_and_missing_field(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = small_config(tmp_path, f"data.domains=[{{name: e, source: '{empty}'}}]")
    with pytest.raises(ConfigError, match="empty") as err:
        corpora.resolve_sources(cfg.data)
    assert err.value.key == "data.domains.0.source"

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"content": "a"}\n{"content": "b"}\n')
    cfg = small_config(tmp_path, f"data.domains=[{{name: r, source: '{rows}'}}]")
    (src,) = corpora.resolve_sources(cfg.data)
    with pytest.raises(ConfigError, match="has no field 'text'") as err:
        corpora.read_documents(src, cfg.data)
    assert err.value.key == "data.domains.0.text_key"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    cfg = small_config(tmp_path, f"data.domains=[{{name: b, source: '{bad}'}}]")
    (src,) = corpora.resolve_sources(cfg.data)
    with pytest.raises(BtxError, match=r"bad.jsonl:2 is not valid JSON"):
        corpora.read_documents(src, cfg.data)
