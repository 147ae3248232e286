"""Evaluation: lm-eval models for megatron-core checkpoints, BTM ensembles, task data, the
HumanEval sandbox and domain perplexity. The only package that imports `lm_eval`."""
