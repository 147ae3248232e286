"""Generation stops at the same token whether the stop strings are looked for in the whole
decoded text (the original check) or, as `ScorerLM._stopped` does, in the text of the last few
tokens (confirmed on the whole text): byte-level BPE and sentencepiece-style (Metaspace)
tokenizers, stop strings that span several tokens, multi-byte characters split over byte
tokens, and leading spaces that a window's first token loses when decoded alone."""

import pytest

TEXTS = [
    "Question: what is 2 + 2?\n\nAnswer: 4.\n\nQuestion: and the next one?\n\nAnswer:",
    "def f(x):\n    return x\n\n\ndef g(y):\n    return the_value + y\n",
    "日本語のテキスト、日本。Ünïcödé çàfé — naïve résumé 🙂🙃 end\n\n🙂 done",
    "the theme of the thesis: there, then; other others\t\tthe end",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa the " * 3,
]
STOPS = [["\n\n"], [" the"], ["Question:"], ["日本"], ["é"], ["🙂"], ["\n\nQ", "return"],
         [" "], ["."], ["Answer: 4"], ["the end"], ["naïve résumé 🙂"], ["zzz"], ["\t\t"]]


def _byte_level():
    from nemo_btx.data.tokenizer import train_bpe

    return train_bpe([t * 3 for t in TEXTS], 300)


def _metaspace():
    """A sentencepiece-like BPE: '▁' for spaces, stripped before the first word when decoding."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    from nemo_btx.data.tokenizer import BPE_EOD, Tokenizer

    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", BPE_EOD] + bytes_,
                                  show_progress=False, min_frequency=2)
    backend.train_from_iterator([t * 3 for t in TEXTS[:2] + TEXTS[3:]], trainer=trainer)
    return Tokenizer(backend, BPE_EOD, kind="hf")


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def lm(request):
    from nemo_btx.evaluation.lm import ScorerLM

    obj = object.__new__(ScorerLM)  # only the tokenizer is needed
    obj.tok = _byte_level() if request.param == "byte_level" else _metaspace()
    return obj


def first_stop(ids, check):
    """Generation's loop: the first length at which the check fires (None: never)."""
    for n in range(1, len(ids) + 1):
        if check(ids[:n]):
            return n
    return None


def test_incremental_check_stops_where_the_whole_text_check_does(lm):
    checked = 0
    for text in TEXTS:
        ids = lm.tok.encode(text)
        assert lm.tok.decode(ids) == text  # the tokenizer round-trips: the cases below are real
        for until in STOPS:
            whole = first_stop(ids, lambda g: any(s in lm.tok.decode(g) for s in until))
            window = lm._stop_window(until)
            fast = first_stop(ids, lambda g: lm._stopped(g, until, window))
            assert fast == whole, (text, until, ids)
            checked += whole is not None
    assert checked >= 20  # many of the pairs do stop somewhere


def test_stop_strings_spanning_tokens_are_found(lm):
    ids = lm.tok.encode(TEXTS[2])
    pieces = [lm.tok.decode([i]) for i in ids]
    # some character of the text is split over several byte tokens (each decodes to U+FFFD alone)
    assert any("\ufffd" in p for p in pieces)
    n = first_stop(ids, lambda g: lm._stopped(g, ["🙂🙃"], None))
    assert n is not None and "🙂🙃" in lm.tok.decode(ids[:n]) and "🙂🙃" not in lm.tok.decode(ids[:n - 1])


def test_no_stop_strings_never_stops(lm):
    ids = lm.tok.encode(TEXTS[0])
    assert first_stop(ids, lambda g: lm._stopped(g, [], None)) is None
