"""Process runtime: distributed start-up (distributed.py) and megatron-core's CPU redirections (cpu.py)."""
