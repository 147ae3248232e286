"""An imported Llama-3-style seed sees its tokens as it saw them in pre-training: BOS first.

A tiny random Llama (tests/hf/hf_models.py) with a Llama-3-style tokenizer (its post-processor
adds <|begin_of_text|>) goes through `import-hf`. Our lm-eval model on the imported checkpoint
then encodes and scores every request as lm-eval's own `hf` backend does on the Hugging Face
directory, and the training loss of a document (BOS + text + EOS, as the data stage stores it)
is transformers' loss on the same ids.
"""

import sys

import pytest
import torch

from conftest import REPO
from nemo_btx.config import load_config

sys.path.insert(0, str(REPO / "tests" / "hf"))
sys.path.insert(0, str(REPO / "tests" / "data"))
from hf_models import LLAMA, make_llama  # noqa: E402
from hf_tokenizers import LLAMA3_BOS, write_llama3_tokenizer  # noqa: E402

TEXT = "The cat sat on the mat. def f(x):\n    return x + 1\n12 + 30 = 42\n"
PAIRS = [("The cat sat", " on the mat."), ("def f(x):", "\n    return x"), ("12 + 30 =", " 42"),
         ("The cat ", "sat on"), ("", "The cat sat")]
#: Short windows, so that the rolling text spans several (both sides get the same length).
MAX_LENGTH = 24


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """(HF directory, its import, lm-eval's HFLM on the directory, our NemoBtxLM on the import)."""
    from lm_eval.models.huggingface import HFLM

    from nemo_btx.evaluation.lm import NemoBtxLM
    from nemo_btx.stages.hf import import_hf

    root = tmp_path_factory.mktemp("seed")
    hf_dir = make_llama(root / "hf", max_shard_size="10MB", tokenizer=False)
    write_llama3_tokenizer(hf_dir, LLAMA["vocab_size"])
    imported = import_hf(load_config([f"hf.path={hf_dir}", f"hf.out={root / 'imported'}"]))
    theirs = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=1, max_length=MAX_LENGTH)
    ours = NemoBtxLM(str(imported), precision="fp32", batch_size=2, max_length=MAX_LENGTH)
    return hf_dir, imported, theirs, ours


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_requests_are_encoded_as_lm_eval_hf_encodes_them(seed):
    _, _, theirs, ours = seed
    bos = ours.tok.bos_id
    assert ours.tok.bos_token == LLAMA3_BOS and bos == theirs.tokenizer.bos_token_id == theirs.prefix_token_id
    for context, continuation in PAIRS:
        if context:
            expected = theirs._encode_pair(context, continuation)
        else:  # lm-eval's loglikelihood conditions an empty context on its prefix token
            expected = ([theirs.prefix_token_id], theirs.tok_encode(continuation, add_special_tokens=False))
        assert ours._encode_pair(context, continuation) == expected
        assert expected[0][0] == bos  # every request is scored from BOS
    assert ours._encode(TEXT) == theirs.tok_encode(TEXT) and ours._encode(TEXT)[0] == bos
    assert ours._encode(LLAMA3_BOS + TEXT) == theirs.tok_encode(LLAMA3_BOS + TEXT)  # one BOS, not two


def test_loglikelihoods_equal_lm_eval_hf_backend(seed):
    _, _, theirs, ours = seed
    a, b = theirs.loglikelihood(_requests("loglikelihood", PAIRS)), ours.loglikelihood(_requests("loglikelihood", PAIRS))
    for (x, greedy_x), (y, greedy_y), pair in zip(a, b, PAIRS):
        assert y == pytest.approx(x, rel=1e-4) and greedy_x == greedy_y, (pair, x, y)
    texts = [(TEXT,), (TEXT * 3,)]  # one window, then several
    assert len(ours._encode(TEXT * 3)) > 2 * MAX_LENGTH
    a = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    b = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    assert b == pytest.approx(a, rel=1e-4), (a, b)


def test_greedy_generation_equals_lm_eval_hf_backend(seed):
    _, _, theirs, ours = seed
    args = [("The cat sat", {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False})]
    assert ours.generate_until(_requests("generate_until", args)) == \
        theirs.generate_until(_requests("generate_until", args))


def test_training_loss_of_a_document_is_transformers_loss(seed):
    """The data stage's encoding of one document, through the loss training computes."""
    from transformers import AutoModelForCausalLM

    from nemo_btx.config.schema import ExperimentConfig
    from nemo_btx.evaluation.model import CheckpointModel
    from nemo_btx.training.step import eval_loss, make_batch

    hf_dir, imported, _, ours = seed
    ids = ours.tok.encode_documents([TEXT])[0]
    assert ids[0] == ours.tok.bos_id and ids[-1] == ours.tok.eod_id
    tokens = torch.tensor([ids])
    model = CheckpointModel(imported, precision="fp32")
    cfg = ExperimentConfig(model=model.model_cfg)
    cfg.train.micro_batch_size = cfg.train.global_batch_size = 1
    loss = eval_loss(cfg, [model.module], [make_batch(tokens)])
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(tokens, labels=tokens).loss.item()
    assert loss == pytest.approx(ref, rel=1e-5), (loss, ref)
