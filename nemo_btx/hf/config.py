"""Hugging Face `config.json` <-> our `ModelConfig`.

Import accepts exactly what our megatron-core build computes: a Llama decoder with RMSNorm,
SwiGLU (SiLU), plain RoPE (any theta, no scaling), no biases, grouped-query attention with any
head_dim. Anything else (biases, rope scaling, another activation, quantized weights) is refused
with the config key that makes it different, because importing it anyway would give a model
that silently computes something else. Tied input/output embeddings are accepted and untied on
import (the output layer gets a copy of the embedding), which computes the same logits.

Export writes the config the other way round: LlamaForCausalLM for a dense checkpoint,
MixtralForCausalLM for an MoE (routing checked in `routing.py`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from nemo_btx.config.schema import ModelConfig, MoEConfig
from nemo_btx.errors import BtxError

LLAMA = "LlamaForCausalLM"
MIXTRAL = "MixtralForCausalLM"
#: The dtypes a checkpoint may be written in (config.json names = torch names).
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class UnsupportedModelError(BtxError):
    """A Hugging Face model (or one of ours) that the other side cannot compute exactly."""


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise BtxError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BtxError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise BtxError(f"{path}: not a Hugging Face config (a JSON object of settings), "
                       f"but a JSON {type(hf).__name__}")
    return hf


def _refuse(where: str, key: str, value, why: str) -> None:
    raise UnsupportedModelError(f"{where}: {key}={value!r}: {why}")


#: The config.json keys a Llama import cannot do without (the rest have Llama's defaults).
REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "vocab_size")


def _size(hf: dict, key: str, where: str, default=None) -> int:
    """A positive integer setting of config.json; a missing required one names file and key."""
    value = hf.get(key)
    if value is None:
        if default is not None:
            return default
        raise BtxError(f"{where}: missing key '{key}' (a Llama config.json needs "
                       f"{', '.join(REQUIRED)})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise BtxError(f"{where}: {key}={value!r}: must be a positive integer")
    return int(value)


def _number(hf: dict, key: str, where: str, default: float) -> float:
    """A float setting of config.json (null or absent = `default`)."""
    value = hf.get(key)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BtxError(f"{where}: {key}={value!r}: must be a number")
    return float(value)


def rope_theta(hf: dict, where: str) -> float:
    """The RoPE base; refuses any rope type other than the plain one (no scaling)."""
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if not params:
            continue
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            _refuse(where, key, params, f"rope type {kind!r} is not supported (megatron-core "
                    "here computes plain RoPE; only rope_type 'default' imports exactly)")
    params = hf.get("rope_parameters") or {}
    if params.get("rope_theta") is not None:
        return _number(params, "rope_theta", f"{where} rope_parameters", 10000.0)
    return _number(hf, "rope_theta", where, 10000.0)


def model_config_from_llama(hf: dict, base: ModelConfig, *, where: str, name: str) -> ModelConfig:
    """The ModelConfig of a Llama config.json (`where` names it in errors); `base` supplies
    what HF does not say (seq_length, make_vocab_size_divisible_by, hidden dropout)."""
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and LLAMA not in arch:
        _refuse(where, "model_type", hf.get("model_type"), f"only Llama-architecture models "
                f"({LLAMA}, model_type 'llama') import; architectures={arch}")
    if hf.get("quantization_config"):
        _refuse(where, "quantization_config", hf["quantization_config"].get("quant_method", "?"),
                "quantized weights do not import; use the unquantized checkpoint")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            _refuse(where, key, hf[key], "biases are not supported (megatron-core is built with "
                    "add_bias_linear=False, as Llama is)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _refuse(where, "hidden_act", act, "only SiLU (SwiGLU) imports")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(where, "partial_rotary_factor", hf["partial_rotary_factor"], "only full RoPE imports")
    theta = rope_theta(hf, where)
    if theta != int(theta):
        _refuse(where, "rope_theta", theta, "model.rotary_base is an integer")
    heads = _size(hf, "num_attention_heads", where)
    hidden = _size(hf, "hidden_size", where)
    layers = _size(hf, "num_hidden_layers", where)
    ffn = _size(hf, "intermediate_size", where)
    vocab = _size(hf, "vocab_size", where)
    kv_heads = _size(hf, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        _refuse(where, "num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
    head_dim = _size(hf, "head_dim", where, default=hidden // heads or 1)
    max_pos = _size(hf, "max_position_embeddings", where, default=0) or None
    return dataclasses.replace(
        base,
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=kv_heads if kv_heads != heads else None,
        kv_channels=head_dim if head_dim * heads != hidden else None,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        normalization="RMSNorm",
        norm_epsilon=_number(hf, "rms_norm_eps", where, 1e-6),
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=int(theta),
        untie_embeddings_and_output_weights=True,
        init_method_std=_number(hf, "initializer_range", where, base.init_method_std),
        attention_dropout=_number(hf, "attention_dropout", where, 0.0),
        moe=dataclasses.replace(base.moe, num_experts=None),
    )


def check_exportable(model: ModelConfig, where: str) -> None:
    """Our settings that Llama/Mixtral cannot express (config keys named as ours)."""
    for key, value, want in (("model.normalization", model.normalization, "RMSNorm"),
                             ("model.activation", model.activation, "swiglu"),
                             ("model.position_embedding_type", model.position_embedding_type, "rope")):
        if value != want:
            _refuse(where, key, value, f"Llama/Mixtral need {want}")


def _common(model: ModelConfig, dtype: str, tokens: dict) -> dict:
    heads = model.num_attention_heads
    theta = float(model.rotary_base)
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": model.num_query_groups or heads,
        "head_dim": model.kv_channels or model.hidden_size // heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings or model.seq_length,
        "rms_norm_eps": model.norm_epsilon,
        "initializer_range": model.init_method_std,
        # rope_parameters for transformers >= 5, rope_theta for older readers (vLLM, 4.x).
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_theta": theta,
        "attention_dropout": 0.0,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "use_cache": True,
        "dtype": _DTYPES[dtype],
        "torch_dtype": _DTYPES[dtype],
        "bos_token_id": tokens.get("bos_token_id"),
        "eos_token_id": tokens.get("eos_token_id"),
        "pad_token_id": None,
    }


def llama_config(model: ModelConfig, *, dtype: str, tokens: Optional[dict] = None) -> dict:
    return {"architectures": [LLAMA], "model_type": "llama", **_common(model, dtype, tokens or {}),
            "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def mixtral_config(model: ModelConfig, *, dtype: str, tokens: Optional[dict] = None) -> dict:
    moe: MoEConfig = model.moe
    return {"architectures": [MIXTRAL], "model_type": "mixtral", **_common(model, dtype, tokens or {}),
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.router_topk,
            "router_aux_loss_coef": moe.aux_loss_coeff,
            "output_router_logits": False,
            "router_jitter_noise": 0.0,
            "sliding_window": None}
