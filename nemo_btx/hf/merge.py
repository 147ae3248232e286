"""Hugging Face Llama experts -> one MixtralForCausalLM directory, streamed tensor by tensor.

The same merge rules as the megatron-core mix (`nemo_btx/mixing`), applied to Hugging Face
directories directly, for experts trained elsewhere:

* layer l of source i: `mlp.gate_proj` -> `block_sparse_moe.experts.i.w1`, `up_proj` -> `w3`,
  `down_proj` -> `w2`, copied exactly;
* every other tensor (embeddings, attention, norms, lm_head) is the (mix.average_weights
  weighted) mean of the sources, accumulated in float32 in source order (x0*w0 + x1*w1 + ...,
  the mixer's arithmetic) and cast back to the stored dtype;
* `block_sparse_moe.gate.weight` [experts, hidden] per layer: `random` = N(0, init std) from
  the mixer's per-(train.seed, layer) generator (so both paths draw the same router), or
  `zeros`. `data`, split and blended experts are megatron-only and refused.

Everything is checked before the output directory exists: configs (architecture, and every
shape: hidden, layers, heads, kv heads, head_dim, FFN, vocabulary), tensor names and shapes,
unreadable/truncated files, duplicate sources, an existing output. NaN/Inf is found while
streaming (each tensor is tested as it is read) and aborts before the rename, so the output
either appears complete or not at all. Memory: one tensor per source plus the fp32
accumulator; tensors are written into the safetensors files as they are produced
(`files.stream_shards`), not collected per shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from nemo_btx.config.schema import ExperimentConfig, ModelConfig
from nemo_btx.errors import CheckpointError, ConfigError
from nemo_btx.hf import layout
from nemo_btx.hf.config import LLAMA, mixtral_config, model_config_from_llama, read_config
from nemo_btx.artifacts import staged_dir
from nemo_btx.hf.exporter import TOKENIZER_FILES
from nemo_btx.hf.files import HFReader, plan_shards, stream_shards, write_model_configs

log = logging.getLogger(__name__)

#: What every source must agree on (ModelConfig fields, as import-hf derives them).
_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels", "vocab_size")
#: Mixtral expert tensor -> the Llama MLP tensor it is copied from.
_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def is_hf_llama(path) -> bool:
    """A directory holding a config.json of a Llama-architecture model."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        hf = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return hf.get("model_type") == "llama" or LLAMA in (hf.get("architectures") or [])


def wants_hf_merge(cfg: ExperimentConfig) -> bool:
    """mix.format=mixtral, or mix.experts are Hugging Face Llama directories."""
    if cfg.mix.format == "mixtral":
        return True
    return bool(cfg.mix.experts) and any(is_hf_llama(p) for p in cfg.mix.experts)


@dataclasses.dataclass
class _Source:
    path: Path
    hf: dict
    model: ModelConfig
    reader: HFReader
    tied: bool

    def get(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and self.tied and name not in self.reader:
            name = "model.embed_tokens.weight"
        t = self.reader.read(name)  # plain reads: the mapping's pages would stay resident
        if not _finite(t):
            bad = (~torch.isfinite(t)).sum().item()
            raise CheckpointError(f"{self.path}: tensor {name!r} holds {bad} NaN/Inf values")
        return t


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf: the sum is non-finite whenever an element is (only then, or when the sum
    overflows, is the exact test run). Summed in the stored dtype: torch accumulates bf16 in
    float32 internally, and this is ~25x faster than converting to float32 first."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _open(path: Path, base: ModelConfig, key: str) -> _Source:
    from nemo_btx.hf.importer import _check_tensors

    if not Path(path).is_dir():
        raise ConfigError(key, str(path), "not a directory")
    hf = read_config(path)
    model = model_config_from_llama(hf, base, where=str(Path(path) / "config.json"),
                                    name=Path(path).name)
    reader = HFReader(path)
    tied = bool(hf.get("tie_word_embeddings", False))
    _check_tensors(reader, layout.pieces(model), tied, Path(path))
    return _Source(Path(path), hf, model, reader, tied)


def merge_llamas(experts: Sequence, out, *, base: Optional[ModelConfig] = None, seed_dir=None,
                 weights: Optional[Sequence[float]] = None, router_init: str = "random",
                 seed: int = 1234, topk: Optional[int] = None, aux_loss_coeff: Optional[float] = None,
                 max_shard_bytes: int = 5 * 10**9, key: str = "mix.experts") -> dict:
    """Write the Mixtral made of `experts` (+ `seed_dir`, the last expert) at `out`; return a
    summary. `weights` (one per source, normalised here) weight the averaged tensors."""
    from nemo_btx.mixing.router import _layer_generator

    base = base or ModelConfig()
    paths = [Path(p).expanduser().resolve() for p in experts]
    if seed_dir is not None:
        paths.append(Path(seed_dir).expanduser().resolve())
    if not paths:
        raise ConfigError(key, list(experts), "no sources: give Hugging Face Llama directories")
    seen: Dict[Path, int] = {}
    for i, p in enumerate(paths):
        if p in seen:
            raise ConfigError(key, [str(x) for x in paths], f"{p} is used twice (sources {seen[p]} "
                              f"and {i}); every expert must be a different model")
        seen[p] = i
    out = Path(out).expanduser().resolve()
    if out.exists() or out.is_symlink():
        raise ConfigError("mix.out", str(out), "already exists; remove it or choose another "
                          "mix.out (nothing was written)")
    if out in seen or any(out in p.parents for p in paths):
        raise ConfigError("mix.out", str(out), "would overwrite a source")
    if router_init not in ("random", "zeros"):
        raise ConfigError("mix.router_init", router_init, "writing Mixtral from Hugging Face "
                          "experts supports random or zeros (data needs the megatron mix)")
    n = len(paths)
    if weights is None:
        w = [1.0 / n] * n
    else:
        if len(weights) != n or any(not (x >= 0) or x == float("inf") for x in weights) or sum(weights) <= 0:
            raise ConfigError("mix.average_weights", list(weights),
                              f"needs {n} finite weights >= 0, not all zero (experts, then the seed)")
        w = [float(x) / float(sum(weights)) for x in weights]
    topk = base.moe.router_topk if topk is None else topk
    if not 1 <= topk <= n:
        raise ConfigError("model.moe.router_topk", topk, f"must be between 1 and the {n} experts")

    sources = [_open(p, base, key) for p in paths]
    first = sources[0]
    for src in sources[1:]:
        for f in _SHAPE_FIELDS:
            a, b = getattr(first.model, f), getattr(src.model, f)
            if a != b:
                raise CheckpointError(f"{src.path}: {f}={b}, but {first.path} has {a}; all "
                                      "experts must have the same architecture")
    dense = dataclasses.replace(first.model, name="mixtral")
    moe = dataclasses.replace(dense, moe=dataclasses.replace(
        base.moe, num_experts=n, router_topk=topk,
        aux_loss_coeff=base.moe.aux_loss_coeff if aux_loss_coeff is None else aux_loss_coeff))
    stored = first.reader.dtype("model.embed_tokens.weight")
    dtype_name = str(stored).replace("torch.", "")
    pieces = layout.pieces(moe)
    meta = {p.name: (stored, p.shape) for p in pieces}
    size = torch.tensor([], dtype=stored).element_size()
    shards = plan_shards(((p.name, size * _numel(p.shape)) for p in pieces), max_shard_bytes)
    std = moe.init_method_std

    def produce(name: str) -> torch.Tensor:
        parts = name.split(".")
        if ".block_sparse_moe.experts." in name:  # model.layers.L.block_sparse_moe.experts.E.wK.weight
            layer, e, kind = parts[2], int(parts[5]), parts[6]
            return sources[e].get(f"model.layers.{layer}.mlp.{_EXPERT[kind]}.weight").to(stored)
        if name.endswith("block_sparse_moe.gate.weight"):
            if router_init == "zeros":
                return torch.zeros(n, moe.hidden_size, dtype=stored)
            g = _layer_generator(seed, int(parts[2]))
            return (torch.randn(n, moe.hidden_size, generator=g) * std).to(stored)
        acc = None
        for src, weight in zip(sources, w):
            t = src.get(name).to(torch.float32)
            if acc is None:
                acc = torch.mul(t, weight)
            else:
                acc.add_(t * weight)  # the mixer's arithmetic (bitwise equal results)
            del t
        return acc.to(stored)

    started = time.perf_counter()
    with staged_dir(out, "merging") as tmp:
        index = stream_shards(tmp, shards, meta, produce, on_shard=lambda i, k: log.info(
            "mix: shard %d/%d written", i, k))
        tokens = {k: first.hf.get(k) for k in ("bos_token_id", "eos_token_id")}
        for f in TOKENIZER_FILES:
            if (first.path / f).is_file():
                shutil.copyfile(first.path / f, tmp / f)
        write_model_configs(tmp, mixtral_config(moe, dtype=dtype_name, tokens=tokens), tokens)
        summary = {"stage": "mix", "format": "mixtral", "sources": [str(p) for p in paths],
                   "weights": w, "router_init": router_init, "router_seed": seed,
                   "num_experts": n, "router_topk": topk, "dtype": dtype_name,
                   "tensors": len(pieces), "shards": len(shards),
                   "bytes": index["metadata"]["total_size"]}
        (tmp / "btx_mix.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("mix: %d Hugging Face experts -> %s (MixtralForCausalLM, %d experts top-%d, "
             "%.1f MB, %s) in %.2f s", n, out, n, topk, summary["bytes"] / 1e6, dtype_name,
             time.perf_counter() - started)
    return summary


def merge_from_config(cfg: ExperimentConfig) -> dict:
    """`nemo-btx mix` with Hugging Face experts / mix.format=mixtral."""
    mix = cfg.mix
    if mix.split_experts != 1:
        raise ConfigError("mix.split_experts", mix.split_experts, "split experts have no Mixtral "
                          "form here; writing Mixtral needs mix.split_experts=1")
    if mix.blended:
        raise ConfigError("mix.blended", True, "blended experts are megatron-only; writing "
                          "Mixtral needs mix.blended=false")
    if not mix.experts:
        raise ConfigError("mix.experts", mix.experts, "mix.format=mixtral needs the Hugging Face "
                          "Llama expert directories in mix.experts")
    for p in mix.experts:
        if not is_hf_llama(p):
            raise ConfigError("mix.experts", str(p), "not a Hugging Face Llama directory "
                              "(config.json with model_type llama); mix.format=mixtral reads "
                              "only those (import-hf megatron checkpoints go through "
                              "mix.format=megatron and export-hf)")
    if mix.out is None:
        raise ConfigError("mix.out", None, "writing Mixtral needs an output directory: set mix.out")
    seed_dir = None
    if mix.include_seed:
        seed_dir = mix.seed_checkpoint or str(Path(cfg.run.dir) / "seed" / "weights")
        if not is_hf_llama(seed_dir):
            raise ConfigError("mix.include_seed", True, f"the seed {seed_dir} is not a Hugging "
                              "Face Llama directory: set mix.seed_checkpoint to one, or "
                              "mix.include_seed=false")
    want = cfg.model.moe.num_experts
    n = len(mix.experts) + (1 if seed_dir else 0)
    if want is not None and want != n:
        raise ConfigError("model.moe.num_experts", want, f"mix builds {n} experts; leave it null "
                          f"or set it to {n}")
    return merge_llamas(mix.experts, mix.out, base=cfg.model, seed_dir=seed_dir,
                        weights=mix.average_weights, router_init=mix.router_init,
                        seed=cfg.train.seed)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
