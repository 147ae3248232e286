"""A megatron-core checkpoint as a next-token scorer: full-sequence log-probs and a KV-cached
greedy decoder. The lm-eval adapter (`lm.py`) and the BTM ensemble (`btm.py`) build on this.

Every evaluating process holds the whole model: the checkpoint is a megatron-core distributed
checkpoint, so one written at any TP/PP/EP layout loads here at TP=PP=EP=1 (dist_checkpointing
reshards). Under torchrun the processes are data-parallel ranks (`data_parallel.py`). The
model's shape comes from the checkpoint's marker (`btx_checkpoint.json` holds its
ModelConfig), so any dense or MoE checkpoint of this project loads without a config.

Generation uses megatron-core's `StaticInferenceContext` (its KV cache works on CPU once
`torch.cuda.current_device` is redirected, which `runtime.cpu` does): a prompt is encoded once
and every new token costs one single-token forward, not a re-encoding of the whole prefix.
The cache is allocated once per model and reused by every batch that fits in it; rows that
finish early are dropped from it (`Decoder.keep`), so the batch shrinks as sequences stop.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import List, Sequence

import torch

from nemo_btx.config.schema import ExperimentConfig, ModelConfig, MoEConfig
from nemo_btx.errors import BtxError

log = logging.getLogger(__name__)


def model_config_from_marker(marker: dict) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with (unknown keys from newer versions dropped)."""
    saved = dict(marker.get("model") or {})
    if not saved:
        raise BtxError("the checkpoint marker has no model config; cannot rebuild the model")
    moe = saved.pop("moe", {}) or {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    moe_known = {f.name for f in dataclasses.fields(MoEConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known},
                       moe=MoEConfig(**{k: v for k, v in moe.items() if k in moe_known}))


def ensure_runtime(cfg: ExperimentConfig) -> None:
    """Initialise torch.distributed + megatron parallel state once per process (TP=PP=EP=1;
    under torchrun every process is a data-parallel rank).

    Several models (the experts of a BTM ensemble, the models of `eval.model=all`) share one
    runtime.
    """
    from megatron.core import parallel_state

    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != 1 or \
                parallel_state.get_pipeline_model_parallel_world_size() != 1 or \
                parallel_state.get_expert_model_parallel_world_size() != 1:
            raise BtxError("evaluation holds the whole model in every process (TP=PP=EP=1); "
                           "this process was initialised with model parallelism")
        return
    from nemo_btx.runtime.distributed import init_runtime

    init_runtime(cfg)


class CheckpointModel:
    """One megatron-core GPTModel (dense or MoE) loaded for inference.

    Args:
        checkpoint: a complete checkpoint directory (weights-only or a training checkpoint).
        precision: 'auto' (bf16 on GPU, fp32 on CPU), 'fp32' or 'bf16'.
    """

    def __init__(self, checkpoint, *, precision: str = "auto"):
        from nemo_btx.model.build import build_model, unwrap
        from nemo_btx.training.checkpoint import load_model_weights, read_marker

        self.path = Path(checkpoint)
        self.model_cfg = model_config_from_marker(read_marker(self.path))
        cfg = ExperimentConfig(model=self.model_cfg)
        cfg.train.precision = precision
        ensure_runtime(cfg)
        chunks = build_model(cfg, wrap_ddp=False)
        load_model_weights(chunks, self.path, self.model_cfg)
        self.module = chunks[0]  # Float16Module on bf16: casts the output logits back to fp32
        self.module.eval()
        self.gpt = unwrap(self.module)
        self.device = next(self.gpt.parameters()).device
        self.vocab_size = self.model_cfg.vocab_size
        self.max_length = self.model_cfg.max_position_embeddings or self.model_cfg.seq_length
        self.is_moe = self.model_cfg.moe.num_experts is not None
        self._context = None  # the KV cache, reused across batches (inference_context)
        log.info("loaded %s (%s, %d layers, hidden %d)", self.path,
                 f"MoE {self.model_cfg.moe.num_experts} experts top-{self.model_cfg.moe.router_topk}"
                 if self.is_moe else "dense", self.model_cfg.num_layers, self.model_cfg.hidden_size)

    def _forward(self, tokens: torch.Tensor, start: int = 0, context=None) -> torch.Tensor:
        b, s = tokens.shape
        pos = torch.arange(start, start + s, device=self.device).unsqueeze(0).expand(b, s)
        kwargs = {"inference_context": context, "runtime_gather_output": True} if context is not None else {}
        logits = self.module(tokens.to(self.device), pos, None, **kwargs)
        # the embedding is padded for TP; padded rows are not tokens
        return logits[..., : self.vocab_size].float()

    @torch.inference_mode()
    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, S, V]` log p(next token | tokens[:, :i+1]) for every position (causal, so rows
        may be right-padded: padding never affects the positions before it)."""
        return torch.log_softmax(self._forward(tokens), dim=-1)

    def decoder(self, prompts: torch.Tensor, max_new: int) -> "Decoder":
        """A KV-cached greedy decoder primed with equal-length `prompts` `[B, P]` (one at a
        time per model: they share the model's cache)."""
        return Decoder(self, prompts, max_new)

    def decode_bytes_per_token(self) -> int:
        """Memory one token of one sequence costs while decoding: its keys and values in the
        KV cache, plus the activations of one layer when the prompt is encoded (fp32 upper
        bound: hidden states, attention output and the MLP's hidden layer)."""
        m = self.model_cfg
        heads = m.num_query_groups or m.num_attention_heads
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        kv = 2 * m.num_layers * heads * head_dim * next(self.gpt.parameters()).element_size()
        ffn = m.ffn_hidden_size or 4 * m.hidden_size
        top_k = m.moe.router_topk if self.is_moe else 1
        return kv + 4 * (4 * m.hidden_size + 2 * ffn * top_k)

    def inference_context(self, batch: int, length: int):
        """A KV cache for `batch` rows of `length` tokens: this model's, reset, when it is
        large enough (the memory stays allocated between batches), else a new one kept."""
        from megatron.core.inference.contexts import StaticInferenceContext

        ctx = self._context
        if ctx is None or ctx.max_batch_size < batch or ctx.max_sequence_length < length:
            if ctx is not None:  # grow to cover both, so sizes that alternate allocate once
                batch, length = max(batch, ctx.max_batch_size), max(length, ctx.max_sequence_length)
            ctx = self._context = StaticInferenceContext(batch, length)
        ctx.reset()
        return ctx


class Decoder:
    """Incremental decoding over a static KV cache: `last` holds `[B, V]` log-probs of the
    next token; `step(tokens)` appends one token per row and updates it."""

    def __init__(self, model: CheckpointModel, prompts: torch.Tensor, max_new: int, *,
                 all_positions: bool = False):
        self.model = model
        b, p = prompts.shape
        if p + max_new > model.max_length:
            log.debug("decoding to %d tokens, past the trained length %d", p + max_new, model.max_length)
        self.context = model.inference_context(b, p + max_new)
        # BTM needs every prompt position's distribution (the expert posterior), not only the last.
        self.context.materialize_only_last_token_logits = not all_positions
        with torch.inference_mode():
            logits = model._forward(prompts, 0, self.context)
        self.prompt_logprobs = torch.log_softmax(logits, dim=-1)
        self.last = self.prompt_logprobs[:, -1]
        self.offset = p
        self.context.sequence_len_offset = p
        self.context.enable_decode_mode()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model._forward(tokens.view(-1, 1), self.offset, self.context)
        self.offset += 1
        self.context.sequence_len_offset = self.offset
        self.last = torch.log_softmax(logits[:, -1], dim=-1)
        return self.last

    @torch.inference_mode()
    def keep(self, rows: Sequence[int]) -> None:
        """Go on with only these rows (ascending): their cached keys and values move to the
        front of the cache, which megatron-core reads as rows 0..len(rows)-1."""
        index = torch.as_tensor(rows, dtype=torch.long)
        n = len(rows)
        for k, v in self.context.key_value_memory_dict.values():
            dev = index.to(k.device)
            k[:self.offset, :n] = k[:self.offset].index_select(1, dev)
            v[:self.offset, :n] = v[:self.offset].index_select(1, dev)
        self.last = self.last[index.to(self.last.device)]


def free_memory_bytes(device: torch.device) -> int:
    """Memory still free where the model runs: the GPU's, else the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def pad_right(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def sequence_logprobs(scorer, rows: List[List[int]], pad: int) -> List[torch.Tensor]:
    """Per row, `[len(row) - 1]` log-probs of tokens 1.. given their prefixes (one batch)."""
    logp = scorer.logprobs(pad_right(rows, pad))
    out = []
    for i, r in enumerate(rows):
        target = torch.as_tensor(r[1:], dtype=torch.long, device=logp.device)
        out.append(logp[i, : len(r) - 1].gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu())
    return out
