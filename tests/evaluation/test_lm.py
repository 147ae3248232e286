"""The lm-eval model over megatron-core checkpoints: its numbers are the model's numbers.

Loglikelihoods equal a direct forward pass of the same GPTModel; batching changes only float
rounding; KV-cached greedy generation produces the tokens that re-encoding the whole prefix at
every step produces; stop sequences and max_gen_toks are honoured; MoE checkpoints load too.
"""

import pytest
import torch
from lm_eval.api.instance import Instance

from eval_fixtures import eval_run  # noqa: F401 - fixture

pytestmark = pytest.mark.slow  # every test reads eval_run, a trained run (~30 s)

TEXTS = [("def add(a, b):\n    return", " a + b"), ("The city of", " Paris is large"),
         ("", "import os"), ("12 + 7 =", " 19"), ("x" * 300, " y")]


def req(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def seed_lm(eval_run):  # noqa: F811
    from nemo_btx.evaluation.lm import NemoBtxLM

    return NemoBtxLM(str(eval_run / "seed" / "weights"), batch_size=4)


@pytest.fixture(scope="module")
def moe_lm(eval_run):  # noqa: F811
    from nemo_btx.evaluation.lm import NemoBtxLM

    return NemoBtxLM(str(eval_run / "moe" / "weights"), run_dir=str(eval_run), batch_size=4)


def direct_loglikelihood(lm, context, continuation):
    """Sum of log-softmax of one unbatched GPTModel forward, written out by hand."""
    ctx, cont = lm._encode_pair(context, continuation)
    ids = (ctx + cont)[-(lm.max_length + 1):]
    tokens = torch.tensor([ids[:-1]])
    pos = torch.arange(tokens.shape[1]).unsqueeze(0)
    with torch.no_grad():
        logits = lm.scorer.gpt(tokens, pos, None)[..., : lm.scorer.vocab_size]
    logp = torch.log_softmax(logits.float(), -1)[0]
    n = len(cont)
    target = torch.tensor(ids[-n:])
    picked = logp[-n:].gather(-1, target.unsqueeze(-1)).sum().item()
    return picked, bool((logp[-n:].argmax(-1) == target).all())


def naive_greedy(lm, prompt_ids, n):
    """Greedy decoding by re-encoding the whole sequence for every new token (no cache)."""
    ids = list(prompt_ids)
    for _ in range(n):
        logp = lm.scorer.logprobs(torch.tensor([ids]))
        ids.append(int(logp[0, -1].argmax()))
    return ids[len(prompt_ids):]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["seed", "moe"])
def test_loglikelihood_equals_direct_forward(which, seed_lm, moe_lm):
    lm = seed_lm if which == "seed" else moe_lm
    got = lm.loglikelihood([req("loglikelihood", t) for t in TEXTS])
    for (context, continuation), (ll, greedy) in zip(TEXTS, got):
        want, want_greedy = direct_loglikelihood(lm, context, continuation)
        assert ll == pytest.approx(want, abs=1e-4, rel=1e-5), (context[:20], continuation)
        assert greedy == want_greedy


@pytest.mark.timeout(300)
def test_batching_gives_the_results_of_one_at_a_time(seed_lm):
    reqs = [req("loglikelihood", t) for t in TEXTS]
    seed_lm.batch_size = 4
    batched = seed_lm.loglikelihood(reqs)
    rolling_text = [req("loglikelihood_rolling", ("import os\nimport sys\n" * 20,)),
                    req("loglikelihood_rolling", ("short text",))]
    rolling_b = seed_lm.loglikelihood_rolling(rolling_text)
    gens = [req("generate_until", ("def f(x):\n", {"until": ["\n\n"], "max_gen_toks": 12})),
            req("generate_until", ("Question: 2 + 2 =", {"until": ["\n"], "max_gen_toks": 12})),
            req("generate_until", ("a much longer prompt " * 5, {"until": ["zzz"], "max_gen_toks": 12}))]
    gen_b = seed_lm.generate_until(gens)
    seed_lm.batch_size = 1
    try:
        single = seed_lm.loglikelihood(reqs)
        rolling_s = seed_lm.loglikelihood_rolling(rolling_text)
        gen_s = seed_lm.generate_until(gens)
    finally:
        seed_lm.batch_size = 4
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert rolling_b == pytest.approx(rolling_s, abs=1e-3)
    assert gen_b == gen_s


@pytest.mark.timeout(300)
def test_rolling_loglikelihood_is_the_sum_of_token_logprobs(seed_lm):
    text = "for i in range(10):\n    print(i)\n"
    ids = seed_lm.tok.encode(text)
    assert len(ids) < seed_lm.max_length
    logp = seed_lm.scorer.logprobs(torch.tensor([[seed_lm.eod_id] + ids]))[0]
    want = logp[:-1].gather(-1, torch.tensor(ids).unsqueeze(-1)).sum().item()
    (got,) = seed_lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["seed", "moe"])
def test_kv_cache_generation_equals_reencoding(which, seed_lm, moe_lm):
    lm = seed_lm if which == "seed" else moe_lm
    prompts = [lm.tok.encode(p) for p in ("def f(x):\n    return", "The answer is", "1 + 1 = 2\n2 + 2 =")]
    n = 10
    lm_texts = lm.generate(prompts, until=[], max_new=n)
    for prompt, text in zip(prompts, lm_texts):
        naive = naive_greedy(lm, prompt, n)
        if lm.eod_id in naive:
            naive = naive[: naive.index(lm.eod_id)]
        assert text == lm.tok.decode(naive)


@pytest.mark.timeout(300)
def test_stop_sequences_and_max_gen_toks(seed_lm):
    prompt = "def add(a, b):\n"
    (free,) = seed_lm.generate_until([req("generate_until", (prompt, {"until": [], "max_gen_toks": 30}))])
    ids = naive_greedy(seed_lm, seed_lm.tok.encode(prompt), 30)
    ids = ids[: ids.index(seed_lm.eod_id)] if seed_lm.eod_id in ids else ids
    assert free == seed_lm.tok.decode(ids)  # exactly 30 tokens (or up to end-of-document)
    stop = next((free[i:i + 2] for i in range(3, len(free) - 2) if free[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip(f"the model generated nothing to stop on: {free!r}")
    (cut,) = seed_lm.generate_until([req("generate_until", (prompt, {"until": [stop], "max_gen_toks": 30}))])
    assert cut == free.split(stop)[0]
    assert stop not in cut
    (short,) = seed_lm.generate_until([req("generate_until", (prompt, {"until": [], "max_gen_toks": 3}))])
    assert short == seed_lm.tok.decode(ids[:3])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["seed", "moe", "btm"])
def test_batched_generation_equals_one_at_a_time(which, seed_lm, moe_lm, eval_run):  # noqa: F811
    """Prompts of different lengths in one batch, rows leaving it at their own stop string,
    end-of-document or token limit, the KV cache reused across batches: the same token ids as
    generating each prompt alone."""
    if which == "btm":
        from nemo_btx.evaluation.btm import BTMLM

        lm = BTMLM(run_dir=str(eval_run), top_k=2)
    else:
        lm = seed_lm if which == "seed" else moe_lm
    texts = ["def f(x):\n", "Question: 2 + 2 =", "a much longer prompt " * 5, "The city of",
             "import os\nimport", "x", "12 + 7 =", ""]
    prompts = [lm._prompt(lm._encode(t), 12) for t in texts]
    for until in ([], ["e", " the"]):
        alone = [lm.generate_ids([p], until, 12)[0] for p in prompts]
        together = lm.generate_ids(prompts, until, 12)
        assert together == alone, until
    lengths = {len(g) for g in together}
    assert len(lengths) > 1, together  # rows did stop at different steps
    # through lm-eval's entry point: sorted, batched from memory, identical requests once
    reqs = [req("generate_until", (t, {"until": u, "max_gen_toks": 10})) for t in texts for u in (["\n"], ["e"])]
    lm.gen_batch_size = None
    batched = lm.generate_until(reqs + reqs[:3])
    lm.gen_batch_size = 1
    try:
        single = lm.generate_until(reqs)
    finally:
        lm.gen_batch_size = None
    assert batched == single + single[:3]


@pytest.mark.timeout(300)
def test_allgather_dispatcher_and_lean_decoder_change_nothing(moe_lm):
    """Decoding swaps the MoE layers' all-to-all token dispatcher (no EP here) for megatron-core's
    all-gather one and takes the greedy argmax on the logits without a log-softmax per step
    (`model.Decoder`): log-probs bit-identical, and the same greedy tokens as before."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import (MoEAllGatherTokenDispatcher,
                                                                 MoEAlltoAllTokenDispatcher)

    from nemo_btx.evaluation.model import Decoder, use_allgather_dispatcher

    scorer = moe_lm.scorer
    layers = [m for m in scorer.gpt.modules() if hasattr(m, "token_dispatcher")]
    assert layers
    for layer in layers:  # back to what the checkpoint's config builds (a decoder may have swapped it)
        layer.token_dispatcher = MoEAlltoAllTokenDispatcher(
            layer.num_local_experts, layer.local_expert_indices, config=layer.config,
            pg_collection=get_default_pg_collection())
    tokens = torch.tensor([moe_lm.tok.encode(t)[:12] for t in ("def add(a, b):\n    return a + b",
                                                               "The city of Paris is large and old")])
    tokens = tokens[:, : min(len(r) for r in tokens)]

    def greedy(advance):
        dec, out = Decoder(scorer, tokens, 8), []
        for _ in range(8):
            nxt = dec.greedy() if advance else dec.last.argmax(-1)
            assert torch.equal(dec.greedy(), dec.last.argmax(-1))
            out.append(nxt)
            if advance:
                dec.advance(nxt)
            else:
                assert torch.equal(dec.step(nxt), torch.log_softmax(dec.logits, -1))
        return torch.stack(out, 1)

    before, ids_before = scorer.logprobs(tokens), greedy(advance=False)
    assert use_allgather_dispatcher(scorer.gpt) == len(layers)
    assert all(isinstance(layer.token_dispatcher, MoEAllGatherTokenDispatcher) for layer in layers)
    assert use_allgather_dispatcher(scorer.gpt) == 0  # once
    assert torch.equal(scorer.logprobs(tokens), before)
    assert torch.equal(greedy(advance=True), ids_before)
