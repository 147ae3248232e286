"""MiX: dense experts -> one megatron-core MoE checkpoint (and the sparse-upcycling baseline).

    plan.py      config -> MixPlan (sources, expert layout, derived MoE config); no torch
    experts.py   which source FFN units form each expert (BTX, split, blended, upcycle)
    sources.py   upfront checks of the dense checkpoints; slice reader over their index
    shards.py    target-layout slices (meta-built MoE), balanced owners, slice -> source reads
    router.py    router init: random, zeros, data (hidden-state means)
    convert.py   the collective converter
    write.py     staging save + marker + manifest + rename
    job.py       what `nemo-btx mix` / `upcycle` run: checks, runtime, converter

Heavy modules (torch, megatron) are imported by the submodules that need them, not here.
"""
