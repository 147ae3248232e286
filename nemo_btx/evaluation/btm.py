"""Branch-Train-Merge (Li et al., 2022) as an inference-time ensemble of the domain experts.

At every position the next-token distribution is a mixture of the experts' distributions,

    p(x_t | x_<t) = sum_e w_e(t) p_e(x_t | x_<t),
    w_e(t) ∝ prior_e * prod_{s < t, s in the current document} p_e(x_s | x_<s)   (Bayes rule),

restricted to the k experts with the largest weights (renormalised): the paper's BTM top-1
and top-2 baselines. The posterior restarts after every end-of-document token, so a batch of
concatenated documents is scored like the documents one by one. The prior is uniform, given,
or estimated (`estimate_prior`: the mean posterior on held-out text, as BTM's "cached prior").

`routing="tfidf"` is the other BTM variant: the weights come from the tf-idf cosine similarity
of the document so far to each domain's training data (token-id unigrams), top-k, weighted by
similarity; no expert has to score the context for routing.

Cost: every expert runs on every token (N forward passes), which is what BTX's MoE avoids.
"""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence

import numpy as np
import torch

from nemo_btx.errors import BtxError
from nemo_btx.evaluation.lm import ScorerLM
from nemo_btx.run_dir import WEIGHTS, RunDir

log = logging.getLogger(__name__)


def doc_start_mask(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """`[B, S]` index of the last end-of-document token at or before each position (-1: none)."""
    b, s = tokens.shape
    pos = torch.arange(s).expand(b, s)
    marks = torch.where(tokens.cpu() == eod_id, pos, torch.full_like(pos, -1))
    return torch.cummax(marks, dim=1).values


def posterior_logweights(token_logps: torch.Tensor, tokens: torch.Tensor, eod_id: int,
                         log_prior: torch.Tensor) -> torch.Tensor:
    """`[E, B, S]` log posterior over experts for predicting token t+1 from tokens 0..t.

    Args:
        token_logps: `[E, B, S-1]` log p_e(x_{s} | x_<s) for s = 1..S-1.
        tokens: `[B, S]` the ids (for document boundaries).
        log_prior: `[E]`.
    """
    e, b, _ = token_logps.shape
    # C[t] = sum_{s=1..t} log p_e(x_s | x_<s), C[0] = 0
    cum = torch.cat([torch.zeros(e, b, 1, dtype=token_logps.dtype, device=token_logps.device),
                     token_logps.cumsum(-1)], dim=-1)
    last_eod = doc_start_mask(tokens, eod_id).to(cum.device)  # the document starts after it
    base = torch.where(last_eod >= 0, cum.gather(-1, last_eod.clamp(min=0).expand(e, b, -1)),
                       torch.zeros_like(cum))
    return log_prior.view(e, 1, 1).to(cum.device) + cum - base


def top_k_normalise(logw: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Keep the k largest weights along dim 0 and renormalise (log space)."""
    if k is not None and k < logw.shape[0]:
        kth = logw.topk(k, dim=0).values[-1:]
        logw = torch.where(logw >= kth, logw, torch.full_like(logw, -math.inf))
    return torch.log_softmax(logw, dim=0)


class TfidfRouter:
    """Token-id tf-idf centroids of each domain's training data (BTM's domain router).

    Args:
        domain_docs: per domain, a list of token-id documents (a sample of its training data).
    """

    def __init__(self, domain_docs: Sequence[Sequence[Sequence[int]]], vocab_size: int):
        docs = [np.bincount(np.asarray(d, dtype=np.int64), minlength=vocab_size)[:vocab_size]
                for docs_of_domain in domain_docs for d in docs_of_domain]
        owner = [i for i, docs_of_domain in enumerate(domain_docs) for _ in docs_of_domain]
        if not docs:
            raise BtxError("tf-idf routing needs training documents for every domain")
        counts = np.stack(docs).astype(np.float64)
        df = (counts > 0).sum(0)
        self.idf = np.log((1 + len(docs)) / (1 + df)) + 1.0  # scikit-learn's smooth idf
        vecs = counts * self.idf
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
        owner = np.asarray(owner)
        cent = np.stack([vecs[owner == i].mean(0) for i in range(len(domain_docs))])
        self.centroids = cent / (np.linalg.norm(cent, axis=1, keepdims=True) + 1e-12)

    def similarities(self, tokens: Sequence[int]) -> np.ndarray:
        """`[S, E]` cosine similarity of each prefix tokens[:t+1] to each domain."""
        s, idf = len(tokens), self.idf
        out = np.zeros((s, self.centroids.shape[0]))
        counts: dict = {}
        dots = np.zeros(self.centroids.shape[0])
        sq = 0.0
        for t, tok in enumerate(tokens):
            n = counts.get(tok, 0)
            counts[tok] = n + 1
            w = idf[tok] if tok < len(idf) else 0.0
            dots += w * self.centroids[:, tok] if tok < len(idf) else 0.0
            sq += w * w * (2 * n + 1)
            out[t] = dots / (math.sqrt(sq) + 1e-12)
        return out

    def logweights(self, tokens: torch.Tensor, eod_id: int, k: Optional[int]) -> torch.Tensor:
        """`[E, B, S]` log weights: top-k domains by similarity of the document so far."""
        rows = []
        for row in tokens.tolist():
            sims = np.zeros((len(row), self.centroids.shape[0]))
            start = 0
            for t, tok in enumerate(row + [eod_id]):
                if tok == eod_id or t == len(row):
                    end = min(t + 1, len(row))
                    if end > start:
                        sims[start:end] = self.similarities(row[start:end])
                    start = t + 1
            rows.append(sims)
        sim = torch.as_tensor(np.stack(rows), dtype=torch.float32).permute(2, 0, 1)  # [E, B, S]
        logw = torch.log(sim.clamp(min=1e-6))
        return top_k_normalise(logw, k)


class Ensemble:
    """N expert scorers (CheckpointModel) combined per token; the scorer API of `lm.py`.

    Args:
        experts: the expert models (same tokenizer and vocabulary).
        top_k: experts kept per token (None = all).
        prior: `[E]` prior probabilities (None = uniform).
        router: a TfidfRouter for routing="tfidf"; None = Bayes posterior.
    """

    def __init__(self, experts: Sequence, eod_id: int, *, top_k: Optional[int] = None,
                 prior: Optional[Sequence[float]] = None, router: Optional[TfidfRouter] = None):
        if not experts:
            raise BtxError("a BTM ensemble needs at least one expert")
        sizes = {e.vocab_size for e in experts}
        if len(sizes) != 1:
            raise BtxError(f"experts disagree on the vocabulary size: {sorted(sizes)}")
        self.experts = list(experts)
        self.eod_id = eod_id
        self.top_k = top_k
        self.vocab_size = sizes.pop()
        self.max_length = min(e.max_length for e in experts)
        self.device = getattr(self.experts[0], "device", torch.device("cpu"))
        p = torch.full((len(experts),), 1.0 / len(experts)) if prior is None else torch.as_tensor(prior, dtype=torch.float32)
        if p.shape != (len(experts),) or (p < 0).any() or float(p.sum()) <= 0:
            raise BtxError(f"prior must be {len(experts)} non-negative numbers, got {list(p.tolist())}")
        self.log_prior = torch.log(p / p.sum())
        self.router = router

    def expert_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([e.logprobs(tokens).cpu() for e in self.experts])  # [E, B, S, V]

    def weights(self, tokens: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        """`[E, B, S]` log mixture weights for each position's next token."""
        if self.router is not None:
            return self.router.logweights(tokens, self.eod_id, self.top_k)
        target = tokens[:, 1:].cpu().unsqueeze(0).unsqueeze(-1).expand(lp.shape[0], -1, -1, 1)
        token_lp = lp[:, :, :-1].gather(-1, target).squeeze(-1)
        return top_k_normalise(posterior_logweights(token_lp, tokens, self.eod_id, self.log_prior), self.top_k)

    @torch.inference_mode()
    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        lp = self.expert_logprobs(tokens)
        logw = self.weights(tokens, lp)
        return torch.logsumexp(logw.unsqueeze(-1) + lp, dim=0)

    def decoder(self, prompts: torch.Tensor, max_new: int) -> "EnsembleDecoder":
        return EnsembleDecoder(self, prompts, max_new)

    def decode_bytes_per_token(self) -> int:
        # every expert keeps its own cache and materialises every prompt position's logits
        return sum(e.decode_bytes_per_token() + 8 * e.vocab_size for e in self.experts)


class EnsembleDecoder:
    """Every expert decodes over its own KV cache; the weights follow the generated tokens."""

    def __init__(self, ens: Ensemble, prompts: torch.Tensor, max_new: int):
        from nemo_btx.evaluation.model import Decoder

        self.ens = ens
        self.decoders = [Decoder(e, prompts, max_new, all_positions=True) for e in ens.experts]
        lp = torch.stack([d.prompt_logprobs.cpu() for d in self.decoders])  # [E, B, P, V]
        self.tokens = prompts.cpu()
        if ens.router is None:
            target = prompts[:, 1:].cpu().unsqueeze(0).unsqueeze(-1).expand(lp.shape[0], -1, -1, 1)
            token_lp = lp[:, :, :-1].gather(-1, target).squeeze(-1)
            # running log-score of the current document per expert (before the prior)
            self.score = posterior_logweights(token_lp, prompts, ens.eod_id,
                                              torch.zeros_like(ens.log_prior))[:, :, -1]
        self.current = lp[:, :, -1]  # [E, B, V]
        self.last = self._mix()

    def _logw(self) -> torch.Tensor:
        if self.ens.router is not None:
            return self.ens.router.logweights(self.tokens, self.ens.eod_id, self.ens.top_k)[:, :, -1]
        return top_k_normalise(self.ens.log_prior.view(-1, 1) + self.score, self.ens.top_k)

    def _mix(self) -> torch.Tensor:
        return torch.logsumexp(self._logw().unsqueeze(-1) + self.current, dim=0)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.view(-1).cpu()
        if self.ens.router is None:
            got = self.current.gather(-1, tokens.view(1, -1, 1).expand(self.current.shape[0], -1, 1)).squeeze(-1)
            self.score = torch.where(tokens == self.ens.eod_id, torch.zeros_like(self.score), self.score + got)
        self.tokens = torch.cat([self.tokens, tokens.view(-1, 1)], dim=1)
        self.current = torch.stack([d.step(tokens).cpu() for d in self.decoders])
        self.last = self._mix()
        return self.last

    def keep(self, rows) -> None:
        """Go on with only these rows (ascending), as `Decoder.keep`."""
        for d in self.decoders:
            d.keep(rows)
        index = torch.as_tensor(rows, dtype=torch.long)
        self.tokens, self.current, self.last = self.tokens[index], self.current[:, index], self.last[index]
        if self.ens.router is None:
            self.score = self.score[:, index]


@torch.inference_mode()
def estimate_prior(ens: Ensemble, batches: Sequence[torch.Tensor]) -> List[float]:
    """Mean posterior (uniform prior, no top-k) over every position of held-out batches."""
    total = torch.zeros(len(ens.experts))
    count = 0
    for tokens in batches:
        lp = ens.expert_logprobs(tokens)
        target = tokens[:, 1:].unsqueeze(0).unsqueeze(-1).expand(lp.shape[0], -1, -1, 1)
        token_lp = lp[:, :, :-1].gather(-1, target).squeeze(-1)
        logw = torch.log_softmax(posterior_logweights(token_lp, tokens, ens.eod_id,
                                                      torch.zeros(len(ens.experts))), dim=0)
        total += logw.exp().sum(dim=(1, 2))
        count += tokens.numel()
    return (total / max(count, 1)).tolist()


def domain_samples(run_dir, domains: Sequence[str], *, max_docs: int = 64, max_tokens: int = 2048
                   ) -> List[List[List[int]]]:
    """Up to `max_docs` training documents (first `max_tokens` ids each) per domain."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from nemo_btx.data.indexed import dataset_prefix, document_subset

    out = []
    for d in domains:
        ds = IndexedDataset(dataset_prefix(run_dir, d, "train"))
        subset = document_subset(run_dir, d, "train")
        docs = np.arange(len(ds)) if subset is None else subset
        step = max(1, len(docs) // max_docs)
        out.append([np.asarray(ds[int(i)][:max_tokens]).tolist() for i in docs[::step][:max_docs]])
    return out


# ----------------------------------------------------------------------------- lm-eval model


def _split_paths(value) -> List[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [p for p in str(value).replace(";", "|").split("|") if p]


class BTMLM(ScorerLM):
    """`lm_eval --model nemo-btx-btm --model_args experts=A|B|C,top_k=2[,run_dir=RUN]`.

    Args:
        experts: expert checkpoint directories separated by `|`; default: every
            `<run_dir>/experts/<domain>/weights` (domains: `domains`, else sorted names).
        top_k: experts per token (1 or 2 in the paper; 0 or None = all).
        prior: `uniform`, `estimate` (mean posterior on the run's validation data) or
            `|`-separated numbers.
        routing: `posterior` (Bayes rule) or `tfidf` (similarity to each domain's training data;
            needs `run_dir` and `domains`).
        domains: `|`-separated domain names matching the experts, for tfidf and estimate.
        tp, pp: the layout every expert runs at (as `nemo-btx`'s; dense experts have no EP).
    """

    def __init__(self, experts=None, top_k=2, run_dir: Optional[str] = None, prior: str = "uniform",
                 routing: str = "posterior", domains=None, batch_size=None, max_length=None,
                 max_gen_toks: int = 256, precision: str = "auto", gen_cap=None, gen_batch_size=None,
                 max_batch_size=None, tp=1, pp=1, layout=None,
                 device=None, **unused):
        from nemo_btx.evaluation.lm import load_run_tokenizer, model_args_layout
        from nemo_btx.evaluation.model import CheckpointModel

        if unused:
            log.warning("nemo-btx-btm: ignoring model_args %s", sorted(unused))
        names = _split_paths(domains) if domains else None
        if experts is None:
            if run_dir is None:
                raise BtxError("nemo-btx-btm needs experts=A|B|... or run_dir=")
            rd = RunDir(run_dir)
            names = names or sorted(p.name for p in rd.experts.iterdir() if (p / WEIGHTS).is_dir())
            paths = [str(rd.expert(n) / WEIGHTS) for n in names]
        else:
            paths = _split_paths(experts)
        layout = layout or model_args_layout(tp, pp)
        models = [CheckpointModel(p, precision=precision, layout=layout) for p in paths]
        tok = load_run_tokenizer(paths[0], run_dir)
        router = None
        if routing == "tfidf":
            if not run_dir or not names or len(names) != len(paths):
                raise BtxError("routing=tfidf needs run_dir= and one domain per expert (domains=a|b)")
            router = TfidfRouter(domain_samples(run_dir, names), models[0].vocab_size)
        elif routing != "posterior":
            raise BtxError(f"routing={routing!r}: use posterior or tfidf")
        k = int(top_k) if top_k not in (None, "", "none", "None") and int(top_k) > 0 else None
        ens = Ensemble(models, tok.eod_id, top_k=k, router=router)
        if prior == "estimate":
            ens.log_prior = torch.log(torch.as_tensor(self._estimate(ens, run_dir, names)))
        elif prior not in (None, "uniform"):
            ens = Ensemble(models, tok.eod_id, top_k=k, router=router,
                           prior=[float(x) for x in _split_paths(prior)])
        self.ensemble = ens
        super().__init__(ens, tok, batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks,
                         gen_cap=gen_cap, gen_batch_size=gen_batch_size)

    @staticmethod
    def _estimate(ens: Ensemble, run_dir, names) -> List[float]:
        from nemo_btx.config import load_config
        from nemo_btx.data.loader import validation_batches

        if not run_dir or not names:
            raise BtxError("prior=estimate needs run_dir= and domains=")
        cfg = load_config([f"run.dir={run_dir}"])
        cfg.model = ens.experts[0].model_cfg  # the batches' shape follows the experts' seq_length
        batches = [b for d in names for b in validation_batches(cfg, run_dir, d, 1)]
        prior = estimate_prior(ens, batches)
        log.info("btm: estimated prior %s", dict(zip(names, [round(p, 3) for p in prior])))
        return prior
