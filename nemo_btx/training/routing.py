"""Which experts each domain's tokens go to: the data behind the paper's routing heatmaps.

A forward hook on every MoE router reads its routing map ([tokens, experts], True where a
token was sent) and adds it up per layer while a domain's validation batches run. Hooks only
read; routing itself is megatron-core's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List

import torch


class RoutingRecorder:
    """Counts top-k assignments per (domain, layer, expert) on this rank's routers.

    With expert parallelism every rank routes its own tokens over all experts (the router is
    replicated), so counts are summed over data-parallel ranks in `fractions()`.
    """

    def __init__(self, chunks: List[torch.nn.Module]):
        from megatron.core.transformer.moe.router import TopKRouter

        from nemo_btx.model.build import unwrap

        self.routers = []  # (global layer number, router)
        for chunk in chunks:
            for name, module in unwrap(chunk).named_modules():
                if isinstance(module, TopKRouter):
                    self.routers.append((module.layer_number, module))
        self.counts: Dict[str, Dict[int, torch.Tensor]] = {}
        self._domain = None
        self._handles = [r.register_forward_hook(self._hook(layer)) for layer, r in self.routers]

    def _hook(self, layer):
        def hook(module, inputs, output):
            if self._domain is None:
                return
            routing_map = output[1]
            per_expert = routing_map.reshape(-1, routing_map.shape[-1]).sum(0).double()
            by_layer = self.counts.setdefault(self._domain, {})
            by_layer[layer] = by_layer.get(layer, 0) + per_expert.cpu()
        return hook

    @contextmanager
    def domain(self, name: str):
        self._domain = name
        try:
            yield
        finally:
            self._domain = None

    def fractions(self) -> Dict[str, Dict[str, List[float]]]:
        """{domain: {layer: [share of top-k assignments per expert]}}, over all DP ranks."""
        from megatron.core import parallel_state

        out: Dict[str, Dict[str, List[float]]] = {}
        for domain, by_layer in sorted(self.counts.items()):
            out[domain] = {}
            for layer, counts in sorted(by_layer.items()):
                total = counts.clone()
                if parallel_state.get_data_parallel_world_size() > 1:
                    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
                out[domain][str(layer)] = (total / total.sum()).tolist()
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
