"""Hugging Face checkpoints in and out: Llama -> megatron-core seed, dense -> Llama, MoE -> Mixtral.

    config.py     config.json <-> ModelConfig, and the Llama features that have no equivalent
    layout.py     tensor names and the few layout changes (fused QKV, fused SwiGLU, padded vocab)
    routing.py    which megatron-core router settings Mixtral computes exactly
    files.py      safetensors headers parsed and checked (no torch), tensors in, shards out
    importer.py   Llama directory -> megatron-core torch_dist checkpoint (+ tokenizer)
    exporter.py   megatron-core checkpoint -> LlamaForCausalLM / MixtralForCausalLM, streamed
    merge.py      Llama experts -> Mixtral directly, the mix's rules, numpy only (no torch)

Only `safetensors` (and numpy) are needed at run time; `transformers` is used by the tests to
build and run the reference models.
"""
