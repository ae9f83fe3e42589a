"""Watch the routers: which experts each token is sent to, and with what gate value.

A hook on every router (`mlp.gate`) reads its (router_logits, top_k_weights, top_k_index) output.
The gate value of expert e for token t is the model's own weight for e (zero when e is not among
the token's top-k), divided by `routed_scaling_factor`: softmax probabilities for DeepSeek-V2,
top-k-normalised sigmoid scores chosen with the correction bias for DeepSeek-V3.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from dsft.arch import layer_index


def unwrap(module: nn.Module) -> nn.Module:
    """The router itself when PEFT wrapped it to train it (`modules_to_save`)."""
    return getattr(module, "original_module", module)


def routers(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> router module (outermost, so a hook sees the active copy of a trained router)."""
    found = {}
    for name, module in model.named_modules():
        router = unwrap(module)
        if name.endswith("mlp.gate") and hasattr(router, "top_k") and hasattr(router, "weight"):
            found[layer_index(name)] = module
    return dict(sorted(found.items()))


def top_k(model: nn.Module) -> int:
    """Experts each token is routed to, read from the first router."""
    return unwrap(next(iter(routers(model).values()))).top_k


@dataclass
class LayerStats:
    """Running sums for one layer over the counted tokens."""

    num_experts: int
    tokens: int = 0
    counts: torch.Tensor = field(init=False)
    gate_sum: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_experts, dtype=torch.float64)
        self.gate_sum = torch.zeros(self.num_experts, dtype=torch.float64)

    def add(self, index: torch.Tensor, weights: torch.Tensor, scale: float) -> None:
        """index, weights: [tokens, top_k] for the tokens that count."""
        flat = index.reshape(-1).cpu()
        self.tokens += index.shape[0]
        self.counts += torch.bincount(flat, minlength=self.num_experts).double()
        self.gate_sum.index_add_(0, flat, weights.reshape(-1).double().cpu() / scale)


class RoutingRecorder:
    """Accumulates LayerStats while installed; `mask` selects the tokens of the next forward."""

    def __init__(self, model: nn.Module) -> None:
        self.routers = routers(model)
        self.stats = {layer: LayerStats(unwrap(r).weight.shape[0]) for layer, r in self.routers.items()}
        self.mask: torch.Tensor | None = None

    def _hook(self, layer: int):
        router = unwrap(self.routers[layer])
        scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)

        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            _, weights, index = output
            keep = self.mask.reshape(-1).to(index.device) if self.mask is not None else slice(None)
            self.stats[layer].add(index[keep], weights[keep], scale)

        return hook

    @contextmanager
    def installed(self) -> Iterator["RoutingRecorder"]:
        handles = [r.register_forward_hook(self._hook(layer)) for layer, r in self.routers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
