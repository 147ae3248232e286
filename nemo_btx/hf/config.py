"""Hugging Face `config.json` <-> our `ModelConfig`, for the families megatron-core computes.

Import accepts exactly what our megatron-core build computes: Llama, Mistral, Qwen2 and Qwen3
decoders (RMSNorm, SwiGLU, grouped-query attention with any head_dim, tied or untied
embeddings) with plain RoPE, Llama-3.1's `llama3` scaling or `linear` interpolation; Qwen2's
q/k/v biases (`model.add_qkv_bias`) and Qwen3's q/k norms (`model.qk_layernorm`). Anything else
(other biases, other rope types, a sliding window shorter than the sequence, another
activation, quantized weights, another architecture) is refused with the config key that makes
it different, because importing it anyway would give a model that silently computes something
else. Tied embeddings are untied on import (the output layer gets a copy), which computes the
same logits. The family is recorded (`model.family`).

Export writes the config the other way round: the family's own class for a dense checkpoint;
for an MoE, Mixtral (Llama, Mistral) or Qwen3-MoE (Qwen3), whose routers compute what
megatron-core's does (`routing.py`); Qwen2 has no exact MoE class (`NO_MOE_CLASS`).
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
        raise BtxError(f"{where}: missing key '{key}' (a decoder's config.json needs "
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


#: model_type -> our model.family, and the dense class export-hf writes for each family.
FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
DENSE_CLASS = {"llama": LLAMA, "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
_CLASS_FAMILY = {cls: fam for fam, cls in DENSE_CLASS.items()}
#: megatron-core's llama3 RoPE scaling: only its factor is a setting, the rest is fixed.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def family_of(hf: dict) -> Optional[str]:
    """Our model.family of a config.json (model_type, else its architecture), or None."""
    if hf.get("model_type") in FAMILIES:
        return FAMILIES[hf["model_type"]]
    for arch in hf.get("architectures") or []:
        if arch in _CLASS_FAMILY:
            return _CLASS_FAMILY[arch]
    return None


def rope_settings(hf: dict, where: str) -> dict:
    """model.rotary_base / rope_scaling / rope_scaling_factor of a config.json: plain RoPE,
    Llama-3.1's `llama3` scaling with megatron-core's fixed frequency band, or `linear` position
    interpolation; any other rope type or band is refused naming its key."""
    # transformers >= 5 writes rope_parameters (theta inside), older ones rope_scaling + rope_theta;
    # a config may carry both, and then they must agree.
    found = [_rope(hf, key, where) for key in ("rope_parameters", "rope_scaling") if hf.get(key)]
    if len(found) == 2 and found[0] != found[1]:
        _refuse(where, "rope_scaling", hf["rope_scaling"], f"disagrees with rope_parameters="
                f"{hf['rope_parameters']!r}")
    return found[0] if found else _rope(hf, None, where)


def _rope(hf: dict, key: Optional[str], where: str) -> dict:
    params = (hf.get(key) or {}) if key else {}  # key None: plain RoPE from rope_theta alone
    if not isinstance(params, dict):
        _refuse(where, key, params, "must be an object of RoPE settings")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = _number(params, "rope_theta", f"{where} {key}", 0.0) or _number(hf, "rope_theta", where, 10000.0)
    if theta != int(theta):
        _refuse(where, "rope_theta", theta, "model.rotary_base is an integer")
    out = {"rotary_base": int(theta), "rope_scaling": None}
    if kind == "default":
        return out
    if kind not in ("llama3", "linear"):
        _refuse(where, f"{key}.rope_type", kind, "megatron-core computes RoPE scaling of type "
                "'llama3' (Llama-3.1/3.2/3.3) and 'linear' only")
    factor = _number(params, "factor", f"{where} {key}", 0.0)
    if factor <= 0:
        _refuse(where, f"{key}.factor", params.get("factor"), "must be a number > 0")
    if kind == "llama3":
        for name, fixed in LLAMA3_FIXED.items():
            if params.get(name) is not None and float(params[name]) != fixed:
                _refuse(where, f"{key}.{name}", params[name], f"megatron-core's llama3 scaling "
                        f"fixes it at {fixed:g} (Llama-3.1's value)")
    return {**out, "rope_scaling": kind, "rope_scaling_factor": factor}


def _window(hf: dict, family: str, base: ModelConfig, where: str) -> None:
    """Sliding-window attention changes nothing only if the window covers the whole sequence."""
    window = hf.get("sliding_window")
    # Qwen configs carry a window that only applies with use_sliding_window (default off).
    used = hf.get("use_sliding_window", False) if family in ("qwen2", "qwen3") else True
    if used and window is not None and window < base.seq_length:
        _refuse(where, "sliding_window", window, f"a window shorter than model.seq_length="
                f"{base.seq_length} is not computed (megatron-core here attends to the whole "
                "causal context)")


def model_config_from_hf(hf: dict, base: ModelConfig, *, where: str, name: str) -> ModelConfig:
    """The ModelConfig of a Llama, Mistral, Qwen2 or Qwen3 config.json (`where` names it in
    errors); `base` supplies what HF does not say (seq_length, vocabulary padding, dropout)."""
    family = family_of(hf)
    if family is None:
        _refuse(where, "model_type", hf.get("model_type"), f"only {', '.join(DENSE_CLASS.values())} "
                f"import; architectures={hf.get('architectures') or []}")
    if hf.get("quantization_config"):
        _refuse(where, "quantization_config", hf["quantization_config"].get("quant_method", "?"),
                "quantized weights do not import; use the unquantized checkpoint")
    if family in ("llama", "mistral", "qwen3"):
        # Llama's/Qwen3's attention_bias puts a bias on o_proj too, which megatron-core lacks.
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                _refuse(where, key, hf[key], "biases are not supported (megatron-core adds "
                        "biases to the query/key/value projection only, as Qwen2 has them)")
    _window(hf, family, base, where)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _refuse(where, "hidden_act", act, "only SiLU (SwiGLU) imports")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(where, "partial_rotary_factor", hf["partial_rotary_factor"], "only full RoPE imports")
    rope = rope_settings(hf, where)
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
        family=family,
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
        **rope,
        add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        untie_embeddings_and_output_weights=True,
        init_method_std=_number(hf, "initializer_range", where, base.init_method_std),
        attention_dropout=_number(hf, "attention_dropout", where, 0.0),
        moe=dataclasses.replace(base.moe, num_experts=None),
    )


#: An MoE of each family is written as this class (model_type): the same routing semantics
#: (softmax over the experts, top-k, weights renormalised; `routing.py` checks the router).
MOE_CLASS = {"llama": (MIXTRAL, "mixtral"), "mistral": (MIXTRAL, "mixtral"),
             "qwen3": ("Qwen3MoeForCausalLM", "qwen3_moe")}
#: Why a family's MoE has no exact Hugging Face class (the README's table says the same).
NO_MOE_CLASS = {"qwen2": "transformers' Qwen2-MoE always adds a sigmoid-gated shared expert to "
                         "every layer, which a BTX MoE does not have"}
#: What each family's attention has: (biases on q/k/v, RMSNorm on q/k heads).
_ATTENTION = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False),
              "qwen3": (False, True)}


def check_exportable(model: ModelConfig, where: str) -> None:
    """Our settings that the family's Hugging Face class cannot express (keys named as ours)."""
    for key, value, want in (("model.normalization", model.normalization, "RMSNorm"),
                             ("model.activation", model.activation, "swiglu"),
                             ("model.position_embedding_type", model.position_embedding_type, "rope")):
        if value != want:
            _refuse(where, key, value, f"the Hugging Face decoders need {want}")
    bias, qk_norm = _ATTENTION[model.family]
    cls = DENSE_CLASS[model.family]
    if model.add_qkv_bias != bias:
        _refuse(where, "model.add_qkv_bias", model.add_qkv_bias, f"model.family={model.family} "
                f"({cls}) has {'' if bias else 'no '}query/key/value biases (qwen2 has them)")
    if model.qk_layernorm != qk_norm:
        _refuse(where, "model.qk_layernorm", model.qk_layernorm, f"model.family={model.family} "
                f"({cls}) has {'' if qk_norm else 'no '}query/key norms (qwen3 has them)")
    if model.moe.num_experts is not None and model.family in NO_MOE_CLASS:
        _refuse(where, "model.family", model.family, f"an MoE does not export exactly: "
                f"{NO_MOE_CLASS[model.family]}")


def rope_config(model: ModelConfig) -> dict:
    """config.json's RoPE keys: rope_parameters for transformers >= 5, rope_theta and (scaled)
    rope_scaling for older readers (transformers 4.x, vLLM), all saying the same."""
    theta = float(model.rotary_base)
    params = {"rope_type": model.rope_scaling or "default", "rope_theta": theta}
    if model.rope_scaling is not None:
        params["factor"] = float(model.rope_scaling_factor)
    if model.rope_scaling == "llama3":
        params.update(LLAMA3_FIXED)
    out = {"rope_parameters": params, "rope_theta": theta}
    if model.rope_scaling is not None:
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def _common(model: ModelConfig, dtype: str, tokens: dict) -> dict:
    heads = model.num_attention_heads
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
        **rope_config(model),
        "attention_dropout": 0.0,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "use_cache": True,
        "dtype": _DTYPES[dtype],
        "torch_dtype": _DTYPES[dtype],
        "bos_token_id": tokens.get("bos_token_id"),
        "eos_token_id": tokens.get("eos_token_id"),
        "pad_token_id": None,
    }


def _family_keys(model: ModelConfig) -> dict:
    """The keys that differ between the dense families (attention and sliding window)."""
    if model.family == "llama":
        return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    if model.family == "mistral":
        return {"sliding_window": None}
    # Qwen2 has its q/k/v biases built in; Qwen3 has q/k norms built in and no biases.
    out = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": model.num_layers}
    if model.family == "qwen3":
        out["attention_bias"] = False
    return out


def hf_model_config(model: ModelConfig, *, dtype: str, tokens: Optional[dict] = None) -> dict:
    """config.json of `model` as its family's class: the dense one, or its MoE class."""
    tokens = tokens or {}
    moe: MoEConfig = model.moe
    if moe.num_experts is None:
        return {"architectures": [DENSE_CLASS[model.family]], "model_type": model.family,
                **_common(model, dtype, tokens), **_family_keys(model)}
    cls, model_type = MOE_CLASS[model.family]
    out = {"architectures": [cls], "model_type": model_type, **_common(model, dtype, tokens),
           "num_experts_per_tok": moe.router_topk, "router_aux_loss_coef": moe.aux_loss_coeff,
           "output_router_logits": False}
    if model_type == "mixtral":
        return {**out, "num_local_experts": moe.num_experts, "router_jitter_noise": 0.0,
                "sliding_window": None}
    # Qwen3-MoE: every layer sparse, experts of model.ffn_hidden_size, top-k weights renormalised.
    return {**out, **_family_keys(model), "num_experts": moe.num_experts,
            "num_local_experts": moe.num_experts, "moe_intermediate_size": model.ffn_hidden_size,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}
