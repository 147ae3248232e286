"""A megatron-core checkpoint as a next-token scorer: full-sequence log-probs and a KV-cached
greedy decoder. The lm-eval adapter (`lm.py`) and the BTM ensemble (`btm.py`) build on this.

A checkpoint is a megatron-core distributed checkpoint, so one written at any TP/PP/EP layout
loads at the evaluation's layout (`eval_layout`; dist_checkpointing reshards): TP=PP=EP=1
by default (every process holds the whole model), or the tensor/pipeline/expert-parallel sizes
of the eval stage's layout. A pipeline's stages run one forward pass through megatron-core's
pipeline schedule (forward only) and the last stage's logits are broadcast to the others, so
every rank of a model replica sees the same log-probs and takes the same decisions; under
torchrun the replicas share the requests (`data_parallel.py`). The model's shape comes from
the checkpoint's marker (`btx_checkpoint.json` holds its ModelConfig), so any dense or MoE
checkpoint of this project loads without a config.

Generation uses megatron-core's `StaticInferenceContext` (its KV cache works on CPU once
`torch.cuda.current_device` is redirected, which `runtime.cpu` does): a prompt is encoded once
and every new token costs one single-token forward, not a re-encoding of the whole prefix.
The cache is allocated once per model and reused by every batch that fits in it; rows that
finish early are dropped from it (`Decoder.keep`), so the batch shrinks as sequences stop.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from nemo_btx.config.schema import ExperimentConfig, ModelConfig, MoEConfig, ParallelConfig
from nemo_btx.errors import BtxError, ConfigError

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


def eval_layout(layout: Optional[ParallelConfig], model: ModelConfig) -> ParallelConfig:
    """The layout a model is evaluated at: the tensor, pipeline and expert-parallel sizes of
    `layout` (default: 1 each), one model chunk per pipeline rank, no context parallelism, and
    no expert parallelism for a dense model (it has no experts to spread)."""
    p = copy.deepcopy(layout) if layout is not None else ParallelConfig()
    if p.cp != 1:
        raise ConfigError("parallel.cp", p.cp, "evaluation does not split sequences over ranks: use 1")
    p.vp = None  # interleaving needs training micro-batches; one chunk per stage holds the same layers
    p.distributed_optimizer, p.overlap_grad_reduce, p.overlap_param_gather = False, None, None
    p.recompute = "none"
    if model.moe.num_experts is None:
        p.ep, p.etp = 1, None
    return p


def ensure_runtime(cfg: ExperimentConfig) -> None:
    """Initialise torch.distributed + megatron parallel state at `cfg.parallel` (under torchrun
    the processes beyond one model replica are data-parallel).

    Several models (the experts of a BTM ensemble, the models of `eval.model=all`) share one
    process group; a model at another layout (a dense model after an MoE one at EP=2) re-lays
    megatron's parallel state out.
    """
    from megatron.core import parallel_state as ps

    from nemo_btx.config.validate import etp_of
    from nemo_btx.runtime.distributed import init_runtime, relayout

    if torch.distributed.is_initialized() and ps.model_parallel_is_initialized():
        p = cfg.parallel
        now = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
               ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
        if now != (p.tp, p.pp, p.ep, etp_of(p)):
            relayout(cfg)
        return
    init_runtime(cfg)


class CheckpointModel:
    """One megatron-core GPTModel (dense or MoE) loaded for inference.

    Args:
        checkpoint: a complete checkpoint directory (weights-only or a training checkpoint).
        precision: 'auto' (bf16 on GPU, fp32 on CPU), 'fp32' or 'bf16'.
    """

    def __init__(self, checkpoint, *, precision: str = "auto", layout: Optional[ParallelConfig] = None):
        from megatron.core import parallel_state

        from nemo_btx.model.build import build_model, unwrap
        from nemo_btx.training.checkpoint import load_model_weights, read_marker

        self.path = Path(checkpoint)
        self.model_cfg = model_config_from_marker(read_marker(self.path))
        cfg = ExperimentConfig(model=self.model_cfg)
        cfg.parallel = eval_layout(layout, self.model_cfg)
        cfg.train.precision = precision
        # No training batch: one that any number of data-parallel ranks divides.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, max(1, world // (cfg.parallel.tp * cfg.parallel.pp))
        ensure_runtime(cfg)
        # Sequence parallelism splits each sequence over the TP ranks: a decoding step's one
        # token cannot be split. megatron-core needs it for MoE training only.
        cfg.parallel.sequence_parallel = False
        chunks = build_model(cfg, wrap_ddp=False)
        load_model_weights(chunks, self.path, self.model_cfg)
        self.module = chunks[0]  # Float16Module on bf16: casts the output logits back to fp32
        self.module.eval()
        self.gpt = unwrap(self.module)
        use_allgather_dispatcher(self.gpt)  # cheaper without EP, same logits (see there)
        self.device = next(self.gpt.parameters()).device
        self.vocab_size = self.model_cfg.vocab_size
        self.max_length = self.model_cfg.max_position_embeddings or self.model_cfg.seq_length
        self.is_moe = self.model_cfg.moe.num_experts is not None
        self.pipeline = parallel_state.get_pipeline_model_parallel_world_size() > 1
        self._context = None  # the KV cache, reused across batches (inference_context)
        p = cfg.parallel
        log.info("loaded %s (%s, %d layers, hidden %d) at tp=%d pp=%d ep=%d", self.path,
                 f"MoE {self.model_cfg.moe.num_experts} experts top-{self.model_cfg.moe.router_topk}"
                 if self.is_moe else "dense", self.model_cfg.num_layers, self.model_cfg.hidden_size,
                 p.tp, p.pp, p.ep)

    def _forward(self, tokens: torch.Tensor, start: int = 0, context=None) -> torch.Tensor:
        b, s = tokens.shape
        tokens = tokens.to(self.device)
        pos = torch.arange(start, start + s, device=self.device).unsqueeze(0).expand(b, s)
        # full-vocabulary logits on every tensor-parallel rank
        kwargs = {"runtime_gather_output": True}
        if context is not None:
            kwargs["inference_context"] = context
        if self.pipeline:
            logits = self._pipeline_forward(tokens, pos, kwargs)
        else:
            logits = self.module(tokens, pos, None, **kwargs)
        # the embedding is padded for TP; padded rows are not tokens
        return logits[..., : self.vocab_size].float()

    def _pipeline_forward(self, tokens: torch.Tensor, pos: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """One forward pass through the pipeline stages (megatron-core's schedule, forward only,
        one micro-batch); the last stage's logits, broadcast to every stage."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(_data, model):
            # no loss function: the last stage's schedule keeps the output itself
            return model(tokens, pos, None, **kwargs), None

        b, s = tokens.shape
        out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[self.module],
                                          num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
        group, last = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_last_rank()
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            logits = out[0].float().contiguous()
            shape = torch.tensor(logits.shape, dtype=torch.long, device=self.device)
        else:
            shape = torch.empty(3, dtype=torch.long, device=self.device)
        torch.distributed.broadcast(shape, src=last, group=group)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            logits = torch.empty(tuple(shape.tolist()), dtype=torch.float32, device=self.device)
        torch.distributed.broadcast(logits, src=last, group=group)
        return logits

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


def use_allgather_dispatcher(gpt: torch.nn.Module) -> int:
    """Give every MoE layer megatron-core's all-gather token dispatcher (the one
    `moe_token_dispatcher_type: allgather` builds) where the layer has no expert or expert-tensor
    parallelism; returns how many layers changed.

    Without EP the two dispatchers permute the same tokens to the same experts and add the same
    products back in the same order (bit-identical logits, tested), but all-to-all's bookkeeping
    (identity all-to-alls, chunk sorting, `.tolist()` syncs) costs ~0.1 ms per layer and step
    when decoding on CPU (4-5% of a step of the tiny MoE: bench/eval_throughput.py). A
    dispatcher holds no weights, so the checkpoint is unchanged; under EP the layer keeps its
    all-to-all.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import (MoEAllGatherTokenDispatcher,
                                                                 MoEAlltoAllTokenDispatcher)
    from megatron.core.utils import get_pg_size

    changed = 0
    for layer in gpt.modules():
        d = getattr(layer, "token_dispatcher", None)
        if not isinstance(layer, MoELayer) or type(d) is not MoEAlltoAllTokenDispatcher:
            continue
        if d.ep_size != 1 or d.tp_size != 1 or get_pg_size(d.tp_ep_group) != 1:
            continue
        layer.token_dispatcher = MoEAllGatherTokenDispatcher(
            layer.num_local_experts, layer.local_expert_indices, config=layer.config,
            pg_collection=get_default_pg_collection())
        changed += 1
    return changed


class Decoder:
    """Incremental decoding over a static KV cache: `logits` holds the `[B, V]` logits of the
    next token, `last` their log-probs (computed when read) and `greedy()` their argmax;
    `step(tokens)` appends one token per row and returns `last`, `advance(tokens)` does the
    same without computing log-probs (greedy decoding never reads them: a log-softmax over the
    vocabulary per step saved, and the argmax is taken on the logits, as transformers' is)."""

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
            self.prompt_logits = model._forward(prompts, 0, self.context)
        self._prompt_logprobs = None
        self.logits = self.prompt_logits[:, -1]
        self._last = None
        self.offset = p
        self.context.sequence_len_offset = p
        self.context.enable_decode_mode()

    @property
    def prompt_logprobs(self) -> torch.Tensor:
        """`[B, P, V]` log-probs after every prompt position (`[B, 1, V]`, the last one, unless
        `all_positions`)."""
        if self._prompt_logprobs is None:
            self._prompt_logprobs = torch.log_softmax(self.prompt_logits, dim=-1)
        return self._prompt_logprobs

    @property
    def last(self) -> torch.Tensor:
        """`[B, V]` log-probs of the next token."""
        if self._last is None:
            self._last = torch.log_softmax(self.logits, dim=-1)
        return self._last

    def greedy(self) -> torch.Tensor:
        """`[B]` the most likely next token of every row."""
        return self.logits.argmax(-1)

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor) -> None:
        logits = self.model._forward(tokens.view(-1, 1), self.offset, self.context)
        self.offset += 1
        self.context.sequence_len_offset = self.offset
        self.logits, self._last = logits[:, -1], None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.advance(tokens)
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
        index = index.to(self.logits.device)
        self.logits = self.logits[index]
        self._last = None if self._last is None else self._last[index]


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
