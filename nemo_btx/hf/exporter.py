"""A megatron-core checkpoint -> a Hugging Face directory (its family's class; for an MoE, Mixtral
or Qwen3-MoE, see `config.py`).

No model is built and no process group is needed: the checkpoint's index says where every
stored chunk is, and each Hugging Face tensor is cut from one megatron-core per-layer tensor
read on its own (`mixing.sources.SliceReader`). Tensors go to safetensors shards one shard at
a time, so memory holds at most one shard plus the per-layer tensor being cut (the q/k/v or
gate/up pieces of one tensor are adjacent and share one read); safetensors serialises a shard
once more while writing it. Measured: a 673 MB fp32 model exported with 100 MB shards peaks
180 MB above the bare interpreter. Everything is written into `.<out>.tmp` and renamed at the
end: a directory at `out` is always complete.

Output: config.json, generation_config.json, model-0000i-of-0000n.safetensors shards with
model.safetensors.index.json, and the run's tokenizer (tokenizer.json + tokenizer_config.json)
when it has one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from nemo_btx.errors import BtxError, CheckpointError
from nemo_btx.hf import layout
from nemo_btx.hf.config import check_exportable, hf_model_config
from nemo_btx.artifacts import staged_dir
from nemo_btx.hf.files import TOKENIZER_FILES, numel, plan_shards, write_model_configs, write_shards
from nemo_btx.data.tokenizer import template_bos
from nemo_btx.hf.routing import check_routing

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in DTYPES.items()}
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


class _Source:
    """One checkpoint's per-layer tensors, read on demand; keeps only the last one read."""

    def __init__(self, path: Path, marker: dict):
        from nemo_btx.mixing.sources import MixSource, SliceReader, check_files, read_index

        self.path = path
        self.index = read_index(path)
        check_files(path, self.index)
        self.tensors = {k: (tuple(v.size), v.properties.dtype)
                        for k, v in self.index.state_dict_metadata.items() if hasattr(v, "chunks")}
        self._reader = SliceReader(MixSource(name="export", path=path, role="seed", marker=marker,
                                             metadata=self.index))
        self._last: Tuple[Optional[tuple], Optional[torch.Tensor]] = (None, None)

    def per_layer_shape(self, key: str, lead: tuple) -> tuple:
        return self.tensors[key][0][len(lead):]

    def read(self, key: str, lead: tuple) -> torch.Tensor:
        if self._last[0] == (key, lead):
            return self._last[1]
        shape, dtype = self.tensors[key]
        region = tuple((i, 1) for i in lead) + tuple((0, n) for n in shape[len(lead):])
        dest = torch.empty([n for _, n in region], dtype=dtype)
        self._last = (None, None)  # free the previous tensor before reading the next
        self._reader.add(key, region, dest)
        self._reader.run()
        if self._reader.errors:
            raise CheckpointError(self._reader.errors[0])
        full = dest.view(shape[len(lead):])
        self._last = ((key, lead), full)
        return full


def _check_pieces(src: _Source, pieces, model, where: str) -> None:
    """Every piece's tensor exists with a shape it can be cut from; every tensor is used."""
    used = set()
    for p in pieces:
        if p.key not in src.tensors:
            raise CheckpointError(f"{where}: has no tensor {p.key!r} (needed for {p.name})")
        shape = src.tensors[p.key][0]
        if len(shape) < len(p.lead) or any(i >= n for i, n in zip(p.lead, shape)):
            raise CheckpointError(f"{where}: tensor {p.key!r} has shape {list(shape)}, too small "
                                  f"for {p.name}")
        try:
            got = tuple(layout.split(p, torch.empty(shape[len(p.lead):], device="meta"), model).shape)
        except RuntimeError:
            got = None
        if got != p.shape:
            raise CheckpointError(f"{where}: tensor {p.key!r} of shape {list(shape)} does not fit "
                                  f"{p.name} {list(p.shape)} of the model in its marker")
        used.add(p.key)
    for key in src.tensors:
        # A training checkpoint also holds optimizer state; only model tensors must map.
        if key.startswith(_MODEL_PREFIXES) and key not in used:
            raise BtxError(f"{where}: tensor {key!r} has no counterpart in the Hugging Face "
                           "model; refusing to drop it")


def tokenizer_files(tokenizer_dir: Optional[Path], out: Path, model) -> dict:
    """Copy the tokenizer into `out`; return {bos,eos}_token_id for config.json."""
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return {}
    from tokenizers import Tokenizer

    tokenizer_dir = Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        tcfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    else:  # our run's tokenizer: tokenizer.json + meta.json (data stage)
        meta_file = tokenizer_dir / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        # The conventions the run recorded: its end-of-document is the EOS, and its BOS (if any)
        # is prepended by transformers as it was by the data stage and our evaluation.
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": meta.get("eod_token"),
                "bos_token": meta.get("bos_token"), "add_bos_token": meta.get("bos_token") is not None,
                "model_max_length": model.max_position_embeddings or model.seq_length,
                "clean_up_tokenization_spaces": False}
        (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
        bos = meta.get("bos_token")
        if bos is not None and template_bos(backend) != bos:
            # transformers (5.x) ignores add_bos_token for a plain tokenizer.json: the BOS goes in
            # through the post-processor, as Llama-3 ships it.
            from tokenizers import processors

            template = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                special_tokens=[(bos, backend.token_to_id(bos))])
            backend.post_processor = template if backend.post_processor is None else \
                processors.Sequence([backend.post_processor, template])
            (out / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")

    def token_id(value):
        text = value.get("content") if isinstance(value, dict) else value
        return backend.token_to_id(text) if text else None

    return {"bos_token_id": token_id(tcfg.get("bos_token")), "eos_token_id": token_id(tcfg.get("eos_token"))}


def export_checkpoint(path: Path, out: Path, *, dtype: str = "auto", max_shard_bytes: int = 5 * 10**9,
                      tokenizer_dir: Optional[Path] = None) -> dict:
    """Write the checkpoint at `path` as a Hugging Face model at `out`; return a summary."""
    from nemo_btx.evaluation.model import model_config_from_marker
    from nemo_btx.training.checkpoint import read_marker

    path, out = Path(path), Path(out)
    where = str(path)
    marker = read_marker(path)
    model = model_config_from_marker(marker)
    check_exportable(model, where)
    src = _Source(path, marker)
    moe = model.moe.num_experts is not None
    if moe:
        check_routing(marker["model"].get("moe") or {}, src.tensors, where)
    pieces = layout.pieces(model, norms=layout.resolve(src.tensors))
    _check_pieces(src, pieces, model, where)
    stored = src.tensors[layout.EMBED][1]
    target = DTYPES[dtype] if dtype != "auto" else stored
    if target not in _NAMES:
        raise BtxError(f"{where}: stored as {stored}; choose hf.dtype=float32|bfloat16|float16")
    size = torch.tensor([], dtype=target).element_size()
    by_name: Dict[str, layout.Piece] = {p.name: p for p in pieces}
    shards = plan_shards(((p.name, size * numel(p.shape)) for p in pieces), max_shard_bytes)

    if out.exists():
        raise BtxError(f"{out}: already exists; choose another hf.out or remove it")
    with staged_dir(out, "exporting") as tmp:
        def produce(name: str) -> torch.Tensor:
            p = by_name[name]
            full = src.read(p.key, p.lead)
            part = layout.split(p, full, model)
            if part.dtype == target and part.is_contiguous() and part.numel() == full.numel():
                return part  # the whole tensor just read: no copy (nothing else refers to it)
            # a piece: its own copy, so that no two tensors of a shard share memory
            return part.to(dtype=target, memory_format=torch.contiguous_format, copy=True)

        index = write_shards(tmp, shards, produce, on_shard=lambda i, n: log.info(
            "export-hf: shard %d/%d written", i, n))
        tokens = tokenizer_files(tokenizer_dir, tmp, model)
        config = hf_model_config(model, dtype=_NAMES[target], tokens=tokens)
        write_model_configs(tmp, config, tokens)
    arch = config["architectures"][0]
    log.info("export-hf: %s -> %s (%s, %d tensors in %d shards, %.1f MB, %s)", path, out, arch,
             len(pieces), len(shards), index["metadata"]["total_size"] / 1e6, _NAMES[target])
    return {"architecture": arch, "tensors": len(pieces), "shards": len(shards),
            "bytes": index["metadata"]["total_size"], "dtype": _NAMES[target]}
