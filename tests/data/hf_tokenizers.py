"""Hugging Face tokenizers of the two BOS conventions, built locally with `tokenizers` (no hub).

Llama-3 declares its BOS only in the tokenizer.json post-processor (tokenizer_config.json names
the token but has no add_bos_token); Qwen2 has no BOS at all and ends documents with the EOS
its tokenizer_config.json names.
"""

import json
from pathlib import Path

LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"
QWEN_EOS = "<|im_end|>"
TEXTS = ["def f(x):\n    return x + 1\n", "The cat sat on the mat. " * 20, "12 + 30 = 42\n" * 10]


def _bpe(vocab_size: int):
    """A byte-level BPE (our trainer) with room for two more special tokens."""
    from nemo_btx.data.tokenizer import train_bpe

    return train_bpe(TEXTS, vocab_size - 2)._tok


def write_llama3_tokenizer(directory: Path, vocab_size: int = 300, **config) -> Path:
    """tokenizer.json whose post-processor puts <|begin_of_text|> first, as Llama-3's does, and
    the tokenizer_config.json Llama-3 ships (plus `config`)."""
    from tokenizers import processors

    backend = _bpe(vocab_size)
    backend.add_special_tokens([LLAMA3_BOS, LLAMA3_EOS])
    bos = backend.token_to_id(LLAMA3_BOS)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{LLAMA3_BOS} $A", pair=f"{LLAMA3_BOS} $A {LLAMA3_BOS} $B:1",
                                      special_tokens=[(LLAMA3_BOS, bos)])])
    return _write(directory, backend, {"bos_token": LLAMA3_BOS, "eos_token": LLAMA3_EOS, **config})


def write_qwen_tokenizer(directory: Path, vocab_size: int = 300, **config) -> Path:
    """No post-processor template, bos_token null, and an EOS that is not <|endoftext|>."""
    backend = _bpe(vocab_size)
    backend.add_special_tokens([QWEN_EOS, "<|im_start|>"])
    return _write(directory, backend, {"bos_token": None, "eos_token": QWEN_EOS, **config})


def _write(directory: Path, backend, config: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(backend.to_str())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}))
    return directory
