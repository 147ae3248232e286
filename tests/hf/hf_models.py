"""Tiny random Llama models built locally with transformers (no hub), and HF logits.

Norm weights are perturbed away from HF's all-ones init, so a norm mapped to the wrong place
changes the logits.
"""

import json
from pathlib import Path

import torch

#: 2 layers, hidden 64, grouped-query attention (4 query heads in 2 groups).
LLAMA = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def perturb_norms(named_parameters, scale: float = 0.1) -> None:
    """Norm weights (and biases, which transformers initialises to zero) moved off their init."""
    with torch.no_grad():
        for name, p in named_parameters:
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * scale)


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE as tokenizer.json + tokenizer_config.json (what save_pretrained writes)."""
    from nemo_btx.data.tokenizer import BPE_EOD, train_bpe

    texts = ["def f(x):\n    return x + 1\n", "The cat sat on the mat. " * 20, "12 + 30 = 42\n" * 10]
    tok = train_bpe(texts, vocab_size)
    (directory / "tokenizer.json").write_text(tok.to_str())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": BPE_EOD, "bos_token": None,
        "clean_up_tokenization_spaces": False}))


def make_llama(directory: Path, *, seed: int = 0, max_shard_size="40KB", tokenizer=True, **overrides) -> Path:
    """save_pretrained of a random LlamaForCausalLM (sharded safetensors by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides}))
    perturb_norms(model.named_parameters())
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)
    if tokenizer:
        write_tokenizer(Path(directory), model.config.vocab_size)
    return Path(directory)


#: Per family: the transformers config class and the settings that make it that family. Llama-3
#: has llama3 RoPE scaling (theta 5e5, head_dim 16: the low-frequency half is scaled), Mistral
#: a window longer than any sequence, Qwen2 tied embeddings (and q/k/v biases, built in), Qwen3
#: an explicit head_dim != hidden/heads (and q/k norms, built in).
FAMILIES = {
    "llama3": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=16384, hidden_size=32, intermediate_size=48)),
    "llama-linear": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                           "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=4096, rope_theta=1e6)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_theta=1e6)),
}


def make_family(directory: Path, family: str, *, seed: int = 0, tokenizer=True, **overrides) -> Path:
    """save_pretrained of a random model of one of `FAMILIES`."""
    import transformers

    config_class, settings = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**LLAMA, **settings, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb_norms(model.named_parameters())
    model.save_pretrained(str(directory), max_shard_size="60KB")
    if tokenizer:
        write_tokenizer(Path(directory), config.vocab_size)
    return Path(directory)


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """float32 logits of the model in `directory` as transformers computes them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def megatron_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    """float32 logits of our megatron-core build of a checkpoint (in this process)."""
    from nemo_btx.evaluation.model import CheckpointModel

    model = CheckpointModel(checkpoint, precision="fp32")
    with torch.no_grad():
        return model._forward(tokens)


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to `rel` of the logits' scale (elementwise relative error is meaningless at 0)."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} x max |logit| {scale:.3g}"


def safetensors_of(directory: Path) -> dict:
    from nemo_btx.hf.files import HFReader

    reader = HFReader(directory)
    return {name: reader.get(name) for name in reader.names()}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))
