"""Model building: megatron-core GPTModel (dense or MoE) from the config."""
