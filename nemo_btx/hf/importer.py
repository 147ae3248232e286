"""A Hugging Face Llama/Mistral/Qwen2/Qwen3 directory -> a megatron-core dense checkpoint (+ its
tokenizer).

The target tensors are not described by hand: the dense GPTModel of the imported config is
built on the meta device (shapes only) exactly as training will build it, and its
`sharded_state_dict()` lists every tensor with its global key, shape and offsets (the mix
stage does the same, `mixing/shards.py`). Each one is filled from its Hugging Face pieces
(`layout.join`) and the whole is written by megatron-core's `dist_checkpointing.save`, so the
result is an ordinary weights checkpoint: `seed.checkpoint` adopts it, `eval` scores it,
`branch` copies it. Memory: one copy of the model (the output tensors); the Hugging Face
files are mapped and read tensor by tensor.

Output (written into `.<out>.tmp`, renamed when complete):

    <out>/                   torch_dist files + btx_checkpoint.json (marker: the model config)
    <out>/manifest.json      source, HF config, dtype, the model.* overrides that rebuild it
    <out>/tokenizer/         tokenizer.json (+ tokenizer_config.json, special_tokens_map.json):
                             data.tokenizer.kind=hf data.tokenizer.path=<out>/tokenizer
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from nemo_btx.config.schema import ExperimentConfig, ModelConfig
from nemo_btx.errors import BtxError, CheckpointError
from nemo_btx.hf import layout
from nemo_btx.hf.config import model_config_from_hf, read_config
from nemo_btx.hf.exporter import DTYPES
from nemo_btx.hf.files import TOKENIZER_FILES, HFReader
from nemo_btx.run_dir import MANIFEST, checkpoint_tokenizer

log = logging.getLogger(__name__)

#: Fields that say what the imported model is (the overrides later stages need).
_MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels", "vocab_size", "max_position_embeddings",
                 "norm_epsilon", "rotary_base", "rope_scaling", "rope_scaling_factor", "add_qkv_bias",
                 "qk_layernorm", "family", "init_method_std")


def overrides_for(model: ModelConfig, base: ModelConfig) -> List[str]:
    """`model.*=value` for every field where the imported model differs from `base`."""
    out = []
    for name in _MODEL_FIELDS:
        value = getattr(model, name)
        if value != getattr(base, name):
            out.append(f"model.{name}={'null' if value is None else value}")
    return out


def _own_runtime(cfg: ExperimentConfig) -> bool:
    """A one-process megatron-core runtime; False when this process already has a fitting one."""
    from megatron.core import parallel_state

    from nemo_btx.runtime.distributed import init_runtime

    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise BtxError("import-hf runs in a single process (it writes a TP=PP=1 checkpoint, "
                           "which loads at any layout)")
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise BtxError("import-hf runs in a single process; start it without torchrun")
    init_runtime(cfg)
    return True


def _fill(shards, pieces, get, model: ModelConfig, padded_vocab: int, target: torch.dtype) -> dict:
    """The state dict to save: every meta shard with its data joined from the HF pieces."""
    parts: Dict[Tuple[str, tuple], Dict[str, str]] = {}
    for p in pieces:
        parts.setdefault((p.key, p.lead), {})[p.part] = p.name
    state, last = {}, (None, None)
    for i, shard in enumerate(shards):
        sh = shard.sh
        n = sh.prepend_axis_num
        key = layout.ALIASES.get(sh.key, (sh.key,))[0]
        lead = tuple(sh.global_offset[:n])
        if (key, lead) not in parts:
            raise CheckpointError(f"megatron-core tensor {sh.key!r} {list(lead)} has no Hugging "
                                  "Face counterpart (an unexpected layer spec)")
        if last[0] != (key, lead):
            last = (None, None)
            full = layout.join({part: get(name) for part, name in parts[(key, lead)].items()},
                               model, padded_vocab)
            last = ((key, lead), full)
        full = last[1]
        region = tuple(slice(o, o + s) for o, s in zip(sh.global_offset[n:], sh.local_shape))
        if tuple(full[region].shape) != tuple(sh.local_shape):
            raise CheckpointError(f"{sh.key}: the Hugging Face tensors give {list(full.shape)}, "
                                  f"megatron-core expects {list(sh.global_shape[n:])}")
        data = full[region].to(dtype=target, memory_format=torch.contiguous_format, copy=True)
        state[f"t{i}"] = dataclasses.replace(sh, data=data, dtype=target, replica_id=0)
    return state


def check_tokenizer(hf_dir: Path, model: ModelConfig) -> None:
    """The tokenizer beside the weights must not produce an id the embedding has no row for
    (fewer ids than rows is normal: Qwen pads its embedding)."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # the Rust library raises a bare Exception on a malformed file
        raise CheckpointError(f"{path}: not a Hugging Face tokenizer.json ({err})") from None
    if ids > model.vocab_size:
        raise CheckpointError(f"{path}: produces ids up to {ids - 1} but config.json vocab_size="
                              f"{model.vocab_size}: not this checkpoint's tokenizer")


def import_hf(hf_dir: Path, out: Path, base: ModelConfig, *, dtype: str = "auto",
              name: Optional[str] = None) -> ModelConfig:
    """Convert the Hugging Face model in `hf_dir` into a weights checkpoint at `out`; return its
    ModelConfig. `base` supplies what config.json does not say (seq_length, vocabulary
    padding); the imported model is written into the checkpoint's marker."""
    from megatron.core import dist_checkpointing

    from nemo_btx.artifacts import software_versions, staged_dir, write_json_atomic
    from nemo_btx.mixing.shards import target_shards
    from nemo_btx.model.build import build_model, padded_vocab_size
    from nemo_btx.runtime.distributed import shutdown
    from nemo_btx.training import checkpoint as ckpt

    hf_dir, out = Path(hf_dir), Path(out)
    hf = read_config(hf_dir)
    model = model_config_from_hf(hf, base, where=str(hf_dir / "config.json"),
                                    name=name or hf_dir.resolve().name)
    reader = HFReader(hf_dir)
    tied = bool(hf.get("tie_word_embeddings", False))
    pieces = layout.pieces(model)
    layout.check_tensors(reader, pieces, tied, hf_dir)
    check_tokenizer(hf_dir, model)
    stored = reader.dtype("model.embed_tokens.weight")
    target = DTYPES[dtype] if dtype != "auto" else stored

    def get(tensor: str) -> torch.Tensor:
        if tensor == "lm_head.weight" and tied and tensor not in reader:
            tensor = "model.embed_tokens.weight"  # untie: the output layer gets a copy
        return reader.get(tensor)

    cfg = ExperimentConfig(model=model)
    cfg.train.precision = "fp32"  # the meta model only describes tensors; their dtype is `target`
    own = _own_runtime(cfg)
    try:
        chunks = build_model(cfg, shapes_only=True)
        shards, objects = target_shards(chunks)
        del chunks
        state = _fill(shards, pieces, get, model, padded_vocab_size(model, 1), target)
        for i, obj in enumerate(objects):
            state[f"o{i}"] = obj
        with staged_dir(out, "importing") as tmp:
            dist_checkpointing.save(state, str(tmp))
            del state
            source = str(hf_dir.resolve())
            write_json_atomic(tmp / ckpt.MARKER, ckpt.make_marker(
                "weights", ckpt.current_layout(), model, {"stage": "import-hf", "source": source}))
            has_tokenizer = (hf_dir / "tokenizer.json").is_file()
            if has_tokenizer:
                checkpoint_tokenizer(tmp).mkdir()
                for f in TOKENIZER_FILES:
                    if (hf_dir / f).is_file():
                        shutil.copyfile(hf_dir / f, checkpoint_tokenizer(tmp) / f)
            else:
                log.warning("import-hf: %s has no tokenizer.json; the data stage needs one "
                            "(data.tokenizer.kind=hf data.tokenizer.path=...)", hf_dir)
            write_json_atomic(tmp / MANIFEST, {
                "stage": "import-hf", "complete": True, "source": source, "hf_config": hf,
                "dtype": str(target).replace("torch.", ""), "tied_embeddings_untied": tied,
                "model": dataclasses.asdict(model), "overrides": overrides_for(model, base),
                "tokenizer": checkpoint_tokenizer(tmp).name if has_tokenizer else None,
                "versions": software_versions()})
    finally:
        if own:
            shutdown()
    log.info("import-hf: %s -> %s (%s, %d layers, hidden %d, %s)", hf_dir, out, model.family,
             model.num_layers, model.hidden_size, str(target).replace("torch.", ""))
    return model
