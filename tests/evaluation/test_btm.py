"""The BTM ensemble: reduces to its expert when there is one (or two identical ones), follows
Bayes rule exactly on a hand-computed example, and its KV-cached generation agrees with its
full-sequence scoring."""

import math

import pytest
import torch

from eval_fixtures import eval_run  # noqa: F401 - fixture
from nemo_btx.evaluation.btm import Ensemble, TfidfRouter, domain_samples, estimate_prior


class FixedExpert:
    """A 'model' whose next-token distribution is the same at every position."""

    def __init__(self, probs):
        self.p = torch.tensor(probs, dtype=torch.float32)
        self.vocab_size = len(probs)
        self.max_length = 64

    def _forward(self, tokens, start=0, context=None):
        b, s = tokens.shape
        return torch.log(self.p).expand(b, s, -1).clone()

    def logprobs(self, tokens):
        return torch.log_softmax(self._forward(tokens), -1)


P1, P2 = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
EOD = 1


def test_posterior_by_hand():
    ens = Ensemble([FixedExpert(P1), FixedExpert(P2)], EOD, prior=[0.6, 0.4])
    tokens = torch.tensor([[0, 2, 2, 1, 0]])
    got = ens.logprobs(tokens).exp()[0]
    # weights before predicting position t+1: prior times likelihood of tokens 1..t of the doc
    w = [(0.6, 0.4),                                  # t=0: nothing seen yet (x0 has no probability)
         (0.6 * 0.2, 0.4 * 0.5),                      # t=1: saw x1=2
         (0.6 * 0.2 * 0.2, 0.4 * 0.5 * 0.5),          # t=2: saw x1, x2
         (0.6, 0.4),                                  # t=3: x3 is end-of-document: posterior restarts
         (0.6 * 0.5, 0.4 * 0.2)]                      # t=4: new document, saw x4=0
    for t, (a, b) in enumerate(w):
        wa, wb = a / (a + b), b / (a + b)
        want = [wa * x + wb * y for x, y in zip(P1, P2)]
        assert got[t].tolist() == pytest.approx(want, abs=1e-6), t
    top1 = Ensemble([FixedExpert(P1), FixedExpert(P2)], EOD, prior=[0.6, 0.4], top_k=1)
    got1 = top1.logprobs(tokens).exp()[0]
    for t, (a, b) in enumerate(w):
        assert got1[t].tolist() == pytest.approx(P1 if a >= b else P2, abs=1e-6), t


def test_estimated_prior_by_hand():
    ens = Ensemble([FixedExpert(P1), FixedExpert(P2)], EOD)
    tokens = torch.tensor([[0, 2]])
    # positions: t=0 uniform (0.5, 0.5); t=1 after x1=2: (0.2, 0.5) normalised
    want = [(0.5 + 0.2 / 0.7) / 2, (0.5 + 0.5 / 0.7) / 2]
    assert estimate_prior(ens, [tokens]) == pytest.approx(want, abs=1e-6)


@pytest.fixture(scope="module")
def experts(eval_run):  # noqa: F811
    from nemo_btx.evaluation.model import CheckpointModel

    return {d: CheckpointModel(eval_run / "experts" / d / "weights") for d in ("code", "math", "wiki")}


@pytest.fixture(scope="module")
def tokens(eval_run):  # noqa: F811
    from nemo_btx.data.tokenizer import load_tokenizer

    tok = load_tokenizer(eval_run)
    rows = [tok.encode("def f(x):\n    return x * 2\n") + [tok.eod_id] + tok.encode("The river flows"),
            tok.encode("12 + 30 = 42. The answer is 42.")]
    width = max(map(len, rows))
    return tok.eod_id, torch.tensor([r + [tok.eod_id] * (width - len(r)) for r in rows])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.slow
def test_one_expert_and_two_identical_experts_equal_the_expert(experts, tokens, top_k):
    eod, toks = tokens
    alone = experts["code"].logprobs(toks)
    one = Ensemble([experts["code"]], eod, top_k=top_k).logprobs(toks)
    two = Ensemble([experts["code"], experts["code"]], eod, top_k=top_k).logprobs(toks)
    torch.testing.assert_close(one, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.slow
def test_cached_generation_agrees_with_full_scoring(experts, tokens, top_k, eval_run):  # noqa: F811
    from nemo_btx.data.tokenizer import load_tokenizer
    from nemo_btx.evaluation.lm import ScorerLM

    eod, toks = tokens
    ens = Ensemble(list(experts.values()), eod, top_k=top_k)
    lm = ScorerLM(ens, load_tokenizer(eval_run), batch_size=2)
    prompts = [toks[0, :9].tolist(), toks[1, :5].tolist()]
    texts = lm.generate(prompts, until=[], max_new=6)
    for prompt, text in zip(prompts, texts):
        ids = list(prompt)
        for _ in range(6):
            nxt = int(ens.logprobs(torch.tensor([ids]))[0, -1].argmax())
            if nxt == eod:
                break
            ids.append(nxt)
        assert text == lm.tok.decode(ids[len(prompt):])


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_tfidf_router_prefers_the_domain_of_the_text(eval_run):  # noqa: F811
    domains = ["code", "math", "wiki"]
    samples = domain_samples(eval_run, domains, max_docs=16, max_tokens=512)
    router = TfidfRouter([s[1:] for s in samples], vocab_size=512)
    for i, d in enumerate(domains):
        sims = router.similarities(samples[i][0])[-1]  # a training document left out of the fit
        assert int(sims.argmax()) == i, (d, sims)
    eod = 0
    w = router.logweights(torch.tensor([samples[1][0][:50]]), eod, k=1).exp()
    assert w[:, 0, -1].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert math.isclose(float(w[:, 0, 10].sum()), 1.0, abs_tol=1e-6)
