"""lm-eval models over our scorers: a megatron-core checkpoint (`nemo-btx`), and the base class
the BTM ensemble (`nemo-btx-btm`, `btm.py`) shares.

A scorer is anything with `logprobs(tokens [B, S]) -> [B, S, V]`, `decoder(prompts, max_new)`
(an object with `.last` `[B, V]`, `.step(tokens [B])` and `.keep(rows)`), `max_length` and
`vocab_size` (and `decode_bytes_per_token()` to size generation batches from memory). The
three lm-eval request types reduce to those two calls:

- `loglikelihood`: context + continuation in one right-padded batch; the continuation's
  summed log-prob and whether greedy decoding would have produced it;
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length`, each scored
  like a loglikelihood request;
- `generate_until`: greedy decoding over a KV cache, prompts sorted by length and batched
  (as many as memory holds, or `gen_batch_size`; rows still inside their prompt are fed their
  own prompt tokens, as megatron's static text-generation controller does), each row stopped
  at its first `until` string, end-of-document or token limit and dropped from the batch.

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
from nemo_btx.evaluation.data_parallel import DataParallel
from nemo_btx.evaluation.model import pad_right

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
#: Generation batches are sized from memory up to this many sequences (measured on CPU:
#: bench/eval_throughput.py; more rows per step stop paying once the matmuls are large).
MAX_GEN_BATCH_SIZE = 64


def _batch_size(value) -> int:
    """lm-eval passes ints, or strings such as 'auto' / 'auto:4' / '16'."""
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str):
        if value.startswith("auto"):
            return DEFAULT_BATCH_SIZE
        return int(value)
    return int(value)


class ScorerLM(DataParallel, LM):
    """An lm-eval LM over a scorer and the run's tokenizer; under torchrun, one data-parallel
    rank of the evaluation (`data_parallel.py`)."""

    def __init__(self, scorer, tokenizer, *, batch_size=None, max_length: Optional[int] = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, gen_cap: Optional[int] = None,
                 gen_batch_size=None):
        super().__init__()
        self.scorer = scorer
        self.tok = tokenizer
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or scorer.max_length)
        self.max_gen_toks = int(max_gen_toks)
        #: upper bound on any task's max_gen_toks (small models on CPU: keep evaluation short)
        self.gen_cap = int(gen_cap) if gen_cap else None
        #: sequences decoded together; None = from free memory (`generation_batch_size`)
        self.gen_batch_size = int(gen_batch_size) if gen_batch_size not in (None, "", "None") else None
        self.eod_id = tokenizer.eod_id
        self.eod_text = tokenizer.eod_token
        #: lm-eval's `prefix_token_id`: what an empty context and the first rolling window
        #: condition on
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eod_id
        self._warned_sampling = False
        self._init_data_parallel(getattr(scorer, "device", torch.device("cpu")))

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
        """Greedy continuations, batched: requests with the same stop strings and token limit
        are sorted by prompt length (a batch's prompts are then nearly equal, and the longest
        batch runs first, so a batch size memory cannot hold fails at once), identical
        requests (lm-eval pads ranks with copies) are generated once."""
        groups: Dict[Tuple, List[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            until, max_new = self._gen_settings(dict(kwargs or {}))
            settings.append((self._prompt(self._encode(context), max_new), until, max_new))
            groups.setdefault((tuple(until), max_new), []).append(i)
        out: List[Optional[str]] = [None] * len(requests)
        reporter, done = progress.Reporter("generations", len(requests)), 0
        for (until, max_new), members in groups.items():
            unique: Dict[Tuple[int, ...], List[int]] = {}
            for i in members:
                unique.setdefault(tuple(settings[i][0]), []).append(i)
            prompts = sorted(unique, key=len, reverse=True)
            batch_size = self.generation_batch_size(len(prompts[0]) + max_new)
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                texts = self.generate([list(p) for p in batch], list(until), max_new)
                for prompt, text in zip(batch, texts):
                    for i in unique[prompt]:
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                        done += 1
                reporter.update(done)
        return out  # type: ignore[return-value]

    def generation_batch_size(self, length: int) -> int:
        """Sequences decoded together: `gen_batch_size` when set, else as many as half the free
        memory holds at `length` tokens each (`decode_bytes_per_token`), at most
        MAX_GEN_BATCH_SIZE."""
        if self.gen_batch_size:
            return self.gen_batch_size
        from nemo_btx.evaluation.model import free_memory_bytes

        per_row = self.scorer.decode_bytes_per_token() * length
        return max(1, min(MAX_GEN_BATCH_SIZE, free_memory_bytes(self.device) // 2 // per_row))

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

    def _prompt(self, ids: List[int], max_new: int) -> List[int]:
        """The prompt a generation conditions on: the BOS (else end-of-document) when empty, its
        tail when prompt and generation would not fit in the context window."""
        keep = max(self.max_length - max_new, self.max_length // 2, 1)
        return (ids or [self.prefix_id])[-keep:]

    def generate(self, prompts: List[List[int]], until: List[str], max_new: int) -> List[str]:
        """Greedy continuations of token prompts, each cut at its first stop string."""
        ids = self.generate_ids([self._prompt(p, max_new) for p in prompts], until, max_new)
        return [self._cut(self.tok.decode(g), until) for g in ids]

    def generate_ids(self, prompts: List[List[int]], until: List[str], max_new: int) -> List[List[int]]:
        """Greedy token ids after each prompt, in one batch over a KV cache: up to max_new, the
        end-of-document (not included) or the token that completes a stop string.

        The prompts are encoded together up to the shortest one's length; then every step
        feeds each row its own next prompt token while it is still inside its prompt (as
        megatron's static text-generation controller does) and its greedy choice after. A row
        that finishes leaves the batch, so the rest decode without it. A decoder with
        `greedy()` and `advance(tokens)` (`model.Decoder`) is asked for the argmax and stepped
        without computing log-probs; any other takes `last.argmax` and `step`.
        """
        shortest = min(len(p) for p in prompts)
        longest = max(len(p) for p in prompts)
        dec = self.scorer.decoder(pad_right([p[:shortest] for p in prompts], self.eod_id),
                                  longest - shortest + max_new)
        # a decoder that offers them: argmax on the logits, steps without log-probs
        greedy = getattr(dec, "greedy", None) or (lambda: dec.last.argmax(-1))
        advance = getattr(dec, "advance", None) or dec.step
        window = self._stop_window(until)
        generated: List[List[int]] = [[] for _ in prompts]
        rows = list(range(len(prompts)))  # prompts still decoding, in the decoder's row order
        t = shortest
        while True:
            nxt = greedy().tolist()
            going = []
            for j, i in enumerate(rows):
                p = prompts[i]
                if t < len(p):
                    nxt[j] = p[t]  # still inside this row's prompt
                    going.append(j)
                    continue
                tok = nxt[j]
                if tok == self.eod_id:
                    continue
                generated[i].append(tok)
                if len(generated[i]) < max_new and not self._stopped(generated[i], until, window):
                    going.append(j)
            if not going:
                break
            if len(going) < len(rows):
                dec.keep(going)
                rows, nxt = [rows[j] for j in going], [nxt[j] for j in going]
            advance(torch.tensor(nxt, dtype=torch.long))
            t += 1
        return generated

    @staticmethod
    def _stop_window(until: List[str]) -> int:
        """Tokens at the end of a generation that hold any stop string it newly contains: at
        most one per UTF-8 byte of the longest stop, plus a margin for tokens that decode to
        nothing alone (a BOS) or change the text at the window's start (a leading space)."""
        return 4 + max((len(s.encode("utf-8")) for s in until), default=0)

    def _stopped(self, ids: List[int], until: List[str], window: Optional[int] = None) -> bool:
        """Whether the text of `ids` contains a stop string, called after every new token (so
        the text of `ids[:-1]` contained none). Only the last `window` tokens are decoded: a
        stop string that the new token completes lies within them. A stop string found there
        is confirmed on the whole text, so the answer is the whole text's."""
        if not until:
            return False
        window = window or self._stop_window(until)
        if len(ids) > window and not any(s in self.tok.decode(ids[-window:]) for s in until):
            return False
        text = self.tok.decode(ids)
        return any(s in text for s in until)

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
        gen_batch_size: sequences generated together; default: from free memory.
        tp, pp, ep: the layout each model replica runs at (under torchrun, the processes beyond
            one replica share the requests); default 1 each. `layout` (a ParallelConfig, from
            the eval stage) replaces them.
    """

    def __init__(self, checkpoint: str, run_dir: Optional[str] = None, batch_size=None,
                 max_length: Optional[int] = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 precision: str = "auto", gen_cap: Optional[int] = None, gen_batch_size=None,
                 max_batch_size=None, tp=1, pp=1, ep=1, layout=None,
                 device=None, **unused):
        from nemo_btx.evaluation.model import CheckpointModel

        if unused:
            log.warning("nemo-btx: ignoring model_args %s", sorted(unused))
        scorer = CheckpointModel(checkpoint, precision=precision, layout=layout or model_args_layout(tp, pp, ep))
        super().__init__(scorer, load_run_tokenizer(checkpoint, run_dir), batch_size=batch_size,
                         max_length=max_length, max_gen_toks=max_gen_toks, gen_cap=gen_cap,
                         gen_batch_size=gen_batch_size)


def model_args_layout(tp=1, pp=1, ep=1):
    """The layout lm-eval's `--model_args tp=,pp=,ep=` ask for."""
    from nemo_btx.config.schema import ParallelConfig

    return ParallelConfig(tp=int(tp), pp=int(pp), ep=int(ep))


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
