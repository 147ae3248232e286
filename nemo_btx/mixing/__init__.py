"""MiX: dense experts -> one megatron-core MoE checkpoint (and the sparse-upcycling baseline).

    recipe.py    the merge rules, shared with the Hugging Face merge (hf/merge.py): sources,
                 expert table, averaging weights, top-k, router init, input checks; no torch
    experts.py   the expert table: which source FFN units form each expert (BTX, split,
                 blended, upcycle); no torch
    plan.py      recipe -> MixPlan (megatron-core: MoE config, expert layout in FFN units)
    sources.py   upfront checks of the dense checkpoints; slice reader over their index
    shards.py    target-layout slices (meta-built MoE), balanced owners, slice -> source reads
    router.py    router init: random, zeros, data (hidden-state means)
    convert.py   the collective converter
    write.py     staging save + marker + manifest + rename
    job.py       what `nemo-btx mix` / `upcycle` run: checks, runtime, converter

Heavy modules (torch, megatron) are imported by the submodules that need them, not here.
"""
