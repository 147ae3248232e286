"""Router initialisation: random (the paper), zeros, or from each expert's data.

* `random`: N(0, model.init_method_std), megatron's own router init. The values are drawn per
  layer from a generator seeded by (train.seed, layer) (`Recipe.router_weight`, shared with
  the Hugging Face merge), never from the process's RNG, so the router does not depend on the
  layout or on which rank writes it (the EP=1 and EP=2 mixes are bitwise equal).
* `zeros` (also `Recipe.router_weight`): every expert gets the same score; top-k then falls
  back on index order until the finetune breaks the tie (the aux loss and the LM loss both
  have non-zero router gradients).
* `data`: like mergekit's hidden-state gates. Row e of layer l is the unit-norm mean of what
  layer l's router will see (the pre-MLP norm's output) when expert e's own dense model reads
  a few held-out batches of its own domain (the seed: of every domain). Tokens that look like
  a domain's data then score highest for that domain's expert from the first step. Computing
  it runs each source model forward once at the target TP/PP layout, so it briefly holds one
  dense source's TP/PP shard per rank on top of the converter's usual memory.
Split experts share their source's row (`Recipe.expert_sources`); blended experts have no
domain, so `data` is refused for them (and for upcycling) by the recipe.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, List

import torch

from nemo_btx.mixing.recipe import Recipe
from nemo_btx.mixing.sources import MixSource

log = logging.getLogger(__name__)

#: router_init=data input: the token batches that represent one source, each
#: [train.global_batch_size, model.seq_length + 1] (what data.loader.validation_batches returns).
BatchesFor = Callable[[MixSource], List[torch.Tensor]]


def init_router(recipe: Recipe, buf: torch.Tensor, region, *, hidden: int, std: float,
                means: Dict[int, Dict[int, torch.Tensor]]) -> None:
    """Fill this rank's slice `buf` of router.weight (global [layers, experts, hidden]);
    `means[source][layer]`: the sources' mean hidden states (router_init=data only)."""
    (layer, _), rest = region[0], region[1:]
    drawn = recipe.router_weight(layer, hidden, std)
    if drawn is not None:
        full = torch.from_numpy(drawn)
    else:
        assert recipe.router_init == "data", recipe.router_init
        full = torch.stack([_unit(means[src][layer]) for src in recipe.expert_sources])
    index = tuple(slice(s, s + n) for s, n in rest)
    buf.copy_(full[index])


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp(min=1e-8)


@torch.no_grad()
def hidden_state_means(cfg, source: MixSource, batches: List[torch.Tensor]) -> Dict[int, torch.Tensor]:
    """Collective: mean pre-MLP-norm output per layer (0-based, this rank's pipeline stage).

    `cfg` is the experiment config with the *dense* model; the job's parallel state is the
    MoE target layout, whose TP and PP the dense model shares (EP does not apply to it).
    """
    from megatron.core import parallel_state

    from nemo_btx.model.build import build_model, unwrap
    from nemo_btx.training.batches import rank_microbatches
    from nemo_btx.training.checkpoint import load_model_weights
    from nemo_btx.training.step import eval_loss

    # EP and sequence parallel do not exist for the dense model: turn them off in its config.
    dense_cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, ep=1, etp=None, sequence_parallel=False))
    chunks = build_model(dense_cfg, wrap_ddp=False)
    load_model_weights(chunks, source.path, dense_cfg.model)
    sums: Dict[int, torch.Tensor] = {}
    counts: Dict[int, torch.Tensor] = {}
    handles = []

    def hook(layer: int):
        def record(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            sums[layer] = sums.get(layer, 0) + out.detach().float().sum(dim=(0, 1)).cpu()
            counts[layer] = counts.get(layer, 0) + out.shape[0] * out.shape[1]
        return record

    for chunk in chunks:
        for layer in unwrap(chunk).decoder.layers:
            handles.append(layer.pre_mlp_layernorm.register_forward_hook(hook(layer.layer_number - 1)))
    try:
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        device = next(unwrap(chunks[0]).parameters()).device
        for tokens in batches:
            eval_loss(dense_cfg, chunks, rank_microbatches(dense_cfg, tokens, dp_rank, dp_size, device))
    finally:
        for h in handles:
            h.remove()
    means = {}
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    for layer in sorted(sums):
        packed = torch.cat([sums[layer], torch.tensor([float(counts[layer])])]).double()
        torch.distributed.all_reduce(packed, group=group)
        means[layer] = (packed[:-1] / packed[-1]).float()
    del chunks
    return means
