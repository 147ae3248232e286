"""The random router draw (mix.router_init=random), without torch.

Both writers of a mixed model draw it here, through the recipe (`Recipe.router_weight`): the
megatron-core mix (`router.py`) and the Hugging Face merge (`nemo_btx/hf/merge.py`), which
never imports torch (importing it costs about a second, more than that whole merge of four
271M models), so both give the same router for the same train.seed, bit for bit. numpy's
Generator, seeded by (seed, layer) through a SeedSequence, gives every layer its own stream
whatever the layout that asks for it.
"""

from __future__ import annotations

import numpy as np


def random_router(seed: int, layer: int, num_experts: int, hidden: int, std: float) -> np.ndarray:
    """Layer `layer`'s router weight [num_experts, hidden]: N(0, std^2), float32."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) % 2**64, int(layer)])))
    w = rng.standard_normal((num_experts, hidden), dtype=np.float32)
    w *= np.float32(std)
    return w
