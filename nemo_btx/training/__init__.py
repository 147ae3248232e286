"""Training on megatron-core: batches, the optimizer step, and (later) the resumable loop."""
