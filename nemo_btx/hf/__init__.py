"""Hugging Face checkpoints in and out: Llama -> megatron-core seed, dense -> Llama, MoE -> Mixtral.

    config.py     config.json <-> ModelConfig, and the Llama features that have no equivalent
    layout.py     tensor names and the few layout changes (fused QKV, fused SwiGLU, padded vocab)
    routing.py    which megatron-core router settings Mixtral computes exactly
    files.py      safetensors in (sharded or not, lazily) and out (shard by shard)
    importer.py   Llama directory -> megatron-core torch_dist checkpoint (+ tokenizer)
    exporter.py   megatron-core checkpoint -> LlamaForCausalLM / MixtralForCausalLM, streamed

Only `safetensors` is needed at run time; `transformers` is used by the tests to build and
run the reference models.
"""
