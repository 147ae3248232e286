"""lm-eval models over our scorers: a megatron-core checkpoint (`nemo-btx`), and the base class
the BTM ensemble (`nemo-btx-btm`, `btm.py`) shares.

A scorer is anything with `logprobs(tokens [B, S]) -> [B, S, V]`, `decoder(prompts, max_new)`
(an object with `.last` `[B, V]` and `.step(tokens [B])`), `max_length` and `vocab_size`. The
three lm-eval request types reduce to those two calls:

- `loglikelihood`: context + continuation in one right-padded batch; the continuation's
  summed log-prob and whether greedy decoding would have produced it;
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length`, each scored
  like a loglikelihood request;
- `generate_until`: greedy decoding over a KV cache, batched across prompts of different
  lengths (rows still inside their prompt are fed their own prompt tokens, as megatron's
  static text-generation controller does), stopped at any `until` string or end-of-document.

Every request is encoded as lm-eval's own `hf` backend encodes it for the same tokenizer, so a
seed scores here what it scores there: the tokenizer's BOS in front of each context, rolling
text and prompt when the tokenizer adds one (Llama), and the BOS (else end-of-document) as the
lone context of an empty one and as the rolling windows' prefix.

Requests are sorted by length and batched, and results returned in request order; batching
changes only float rounding (tests check it against one-at-a-time scoring).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from lm_eval.api.model import LM

from nemo_btx import progress
from nemo_btx.errors import BtxError
from nemo_btx.evaluation.model import pad_right

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def _batch_size(value) -> int:
    """lm-eval passes ints, or strings such as 'auto' / 'auto:4' / '16'."""
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str):
        if value.startswith("auto"):
            return DEFAULT_BATCH_SIZE
        return int(value)
    return int(value)


class ScorerLM(LM):
    """An lm-eval LM over a scorer and the run's tokenizer."""

    def __init__(self, scorer, tokenizer, *, batch_size=None, max_length: Optional[int] = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, gen_cap: Optional[int] = None):
        super().__init__()
        self.scorer = scorer
        self.tok = tokenizer
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or scorer.max_length)
        self.max_gen_toks = int(max_gen_toks)
        #: upper bound on any task's max_gen_toks (small models on CPU: keep evaluation short)
        self.gen_cap = int(gen_cap) if gen_cap else None
        self.eod_id = tokenizer.eod_id
        self.eod_text = tokenizer.eod_token
        #: lm-eval's `prefix_token_id`: what an empty context and the first rolling window
        #: condition on
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eod_id
        self._warned_sampling = False

    # ------------------------------------------------------------------------ encoding

    def _encode(self, text: str) -> List[int]:
        """Ids of a request's text as lm-eval's `hf` backend gets them (`tok_encode`): BOS first
        when the tokenizer adds one, but only one if the text already begins with it."""
        bos = self.tok.bos_token
        if bos is None:
            return self.tok.encode(text)
        return [self.tok.bos_id] + self.tok.encode(text[len(bos):] if text.startswith(bos) else text)

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Tokens of context and continuation as the whole string tokenizes (like lm-eval's HF
        model): trailing context spaces move to the continuation, and the continuation's ids
        are the tail of encode(context + continuation), so merges across the seam count."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            # lm-eval encodes the continuation without special tokens and conditions it on the
            # prefix token alone (a context of spaces only ends up the same way)
            return [self.prefix_id], self.tok.encode(continuation)
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------- loglikelihood

    def _score_pairs(self, pairs: Sequence[Tuple[List[int], List[int]]], disable_tqdm: bool = True
                     ) -> List[Tuple[float, bool]]:
        """(sum log p(continuation | context), greedy) per (context ids, continuation ids).

        Requests whose model input is the same (a multiple-choice question's one-token choices
        share the context) are scored from one forward pass.
        """
        rows, n_cont = [], []
        for ctx, cont in pairs:
            if not cont:
                raise BtxError("an empty continuation has no likelihood to score")
            full = (ctx + cont)[-(self.max_length + 1):]
            rows.append(full)
            n_cont.append(min(len(cont), len(full) - 1))
        inputs: Dict[Tuple[int, ...], List[int]] = {}
        for i, r in enumerate(rows):
            inputs.setdefault(tuple(r[:-1]), []).append(i)
        unique = sorted(inputs, key=len, reverse=True)
        out: List[Optional[Tuple[float, bool]]] = [None] * len(rows)
        reporter = progress.Reporter("scored inputs", len(unique))
        for start in self._progress(range(0, len(unique), self.batch_size), disable_tqdm, len(unique)):
            reporter.update(start)
            batch = unique[start:start + self.batch_size]
            logp = self.scorer.logprobs(pad_right([list(b) for b in batch], self.eod_id))
            for j, key in enumerate(batch):
                for i in inputs[key]:
                    r, n = rows[i], n_cont[i]
                    lp = logp[j, len(r) - 1 - n: len(r) - 1].cpu()
                    target = torch.as_tensor(r[len(r) - n:], dtype=torch.long)
                    total = float(lp.gather(-1, target.unsqueeze(-1)).sum())
                    out[i] = (total, bool((lp.argmax(-1) == target).all()))
        reporter.update(len(unique))
        return out  # type: ignore[return-value]

    def _progress(self, it, disable: bool, total: int):
        if disable or self.rank != 0 or total < 4 * self.batch_size:
            return it
        from tqdm import tqdm

        return tqdm(it, desc="batches", leave=False)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = self._score_pairs(pairs, disable_tqdm)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for k, req in enumerate(requests):
            # As lm-eval's hf backend does: with a BOS tokenizer the text's own BOS is scored too,
            # conditioned on the BOS prefix (log p(BOS | BOS) is part of its published perplexities).
            ids = self._encode(req.args[0])
            for w in get_rolling_token_windows(token_list=ids, prefix_token=self.prefix_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(k)
        scores = self._score_pairs(windows, disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scores):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        groups: Dict[Tuple, List[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            until, max_new = self._gen_settings(dict(kwargs or {}))
            settings.append((self._encode(context), until, max_new))
            groups.setdefault((tuple(until), max_new), []).append(i)
        out: List[Optional[str]] = [None] * len(requests)
        reporter, done = progress.Reporter("generations", len(requests)), 0
        for (until, max_new), members in groups.items():
            members.sort(key=lambda i: -len(settings[i][0]))
            for start in range(0, len(members), self.batch_size):
                idx = members[start:start + self.batch_size]
                texts = self.generate([settings[i][0] for i in idx], list(until), max_new)
                for i, text in zip(idx, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                done += len(idx)
                reporter.update(done)
        return out  # type: ignore[return-value]

    def _gen_settings(self, kwargs: dict) -> Tuple[List[str], int]:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if self.gen_cap:
            max_new = min(max_new, self.gen_cap)
        if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0) or 0) > 0 and not self._warned_sampling:
            log.warning("sampling was requested (%s); this model decodes greedily", kwargs)
            self._warned_sampling = True
        return until, max_new

    def generate(self, prompts: List[List[int]], until: List[str], max_new: int) -> List[str]:
        """Greedy continuations of token prompts, each cut at its first stop string."""
        keep = max(self.max_length - max_new, self.max_length // 2, 1)
        prompts = [(p or [self.prefix_id])[-keep:] for p in prompts]
        shortest = min(len(p) for p in prompts)
        longest = max(len(p) for p in prompts)
        dec = self.scorer.decoder(pad_right([p[:shortest] for p in prompts], self.eod_id),
                                  longest - shortest + max_new)
        generated: List[List[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        done = [False] * len(prompts)
        logp = dec.last
        t = shortest
        while True:
            nxt = logp.argmax(-1).cpu()
            for i, p in enumerate(prompts):
                if t < len(p):
                    nxt[i] = p[t]  # still inside this row's prompt
                elif not done[i]:
                    tok = int(nxt[i])
                    if tok == self.eod_id:
                        done[i] = True
                        continue
                    generated[i].append(tok)
                    texts[i] = self.tok.decode(generated[i])
                    if any(s in texts[i] for s in until) or len(generated[i]) >= max_new:
                        done[i] = True
            if all(done):
                break
            logp = dec.step(nxt)
            t += 1
        return [self._cut(text, until) for text in texts]

    @staticmethod
    def _cut(text: str, until: List[str]) -> str:
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text


class NemoBtxLM(ScorerLM):
    """`lm_eval --model nemo-btx --model_args checkpoint=DIR[,run_dir=RUN][,max_length=N]`.

    Args:
        checkpoint: a complete megatron-core checkpoint of this project (dense or MoE).
        run_dir: where the tokenizer is (`<run_dir>/tokenizer`); default: the nearest parent
            directory of the checkpoint that has one.
        max_length: context window; default: the model's trained sequence length.
        precision: auto | fp32 | bf16.
    """

    def __init__(self, checkpoint: str, run_dir: Optional[str] = None, batch_size=None,
                 max_length: Optional[int] = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 precision: str = "auto", gen_cap: Optional[int] = None, max_batch_size=None,
                 device=None, **unused):
        from nemo_btx.evaluation.model import CheckpointModel

        if unused:
            log.warning("nemo-btx: ignoring model_args %s", sorted(unused))
        scorer = CheckpointModel(checkpoint, precision=precision)
        super().__init__(scorer, load_run_tokenizer(checkpoint, run_dir), batch_size=batch_size,
                         max_length=max_length, max_gen_toks=max_gen_toks, gen_cap=gen_cap)


def load_run_tokenizer(checkpoint, run_dir: Optional[str]):
    """The run's tokenizer; for a checkpoint outside any run (an imported seed), the Hugging Face
    tokenizer import-hf copied beside it, with its own BOS/EOS conventions."""
    from nemo_btx.config.schema import TokenizerConfig
    from nemo_btx.data.tokenizer import load_hf, load_tokenizer, seed_tokenizer
    from nemo_btx.run_dir import find_run_dir

    root = Path(run_dir) if run_dir else find_run_dir(Path(checkpoint))
    if root is not None:
        return load_tokenizer(root)
    own = seed_tokenizer(Path(checkpoint))
    if own is None:
        raise BtxError(f"{checkpoint}: no run directory with a tokenizer above it; pass run_dir=")
    return load_hf(TokenizerConfig(kind="hf", path=str(own)))
