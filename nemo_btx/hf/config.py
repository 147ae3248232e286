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
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BtxError(f"{path}: not valid JSON ({err})") from None


def _refuse(where: str, key: str, value, why: str) -> None:
    raise UnsupportedModelError(f"{where}: {key}={value!r}: {why}")


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
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


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
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        _refuse(where, "num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
    head_dim = hf.get("head_dim") or hidden // heads
    return dataclasses.replace(
        base,
        name=name,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=kv_heads if kv_heads != heads else None,
        kv_channels=int(head_dim) if head_dim * heads != hidden else None,
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf["max_position_embeddings"]) if hf.get("max_position_embeddings") else None,
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=int(theta),
        untie_embeddings_and_output_weights=True,
        init_method_std=float(hf.get("initializer_range", base.init_method_std)),
        attention_dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
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
