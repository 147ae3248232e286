"""Data: corpora, tokenizer, megatron indexed datasets and the batches training reads.

`corpora` says where each domain's text comes from, `tokenizer` turns text into ids,
`indexed` writes the per-domain `.bin/.idx` files and the manifest under `<run.dir>/data/`, and
`loader` serves deterministic global batches (a pure function of seed and step) from them.
Only `loader` imports torch and megatron-core at import time; the others load megatron-core when
they write, so a login node can check sources and configs cheaply.
"""
