"""Predictions by arithmetic, without torch: what a model holds on each GPU of a layout, what a
training step costs, and what a stage of the experiment needs (`nemo-btx plan`).

params.py    parameters per rank, as megatron-core lays them out (checked exactly against models
             megatron-core builds on the meta device)
memory.py    bytes per GPU: weights, gradients, optimizer state, activations; host memory of a save
flops.py     training FLOPs per token, step time and GPU-days at an assumed MFU
(orchestration/planning.py puts them together per stage of an experiment: `nemo-btx plan`.)
"""
