"""Which routed experts carry LoRA, checked against the model's config before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsft.config.schema import RoutedExperts
from dsft.errors import DsftError


def moe_layout(config: dict[str, Any]) -> tuple[list[int], int]:
    """(indices of the layers with routed experts, experts per layer) from a config.json dict."""
    layers = config["num_hidden_layers"]
    experts = config.get("n_routed_experts") or config.get("num_local_experts") or config.get("num_experts")
    first_dense = config.get("first_k_dense_replace", 0) or 0
    step = config.get("moe_layer_freq", 1) or 1
    return [i for i in range(first_dense, layers) if (i - first_dense) % step == 0], int(experts or 0)


def expert_selection(spec: RoutedExperts, config_path: Path) -> dict[int, list[int] | None]:
    """Layer -> expert ids (None: all experts) for `adapter.routed_experts`; empty when none."""
    if not spec.enabled:
        return {}
    moe_layers, num_experts = moe_layout(json.loads(config_path.read_text()))
    if spec.experts == "all":
        return dict.fromkeys(moe_layers)
    errors = []
    for layer, ids in spec.experts.items():
        if layer not in moe_layers:
            errors.append(f"adapter.routed_experts: layer {layer} has no routed experts; MoE layers are {moe_layers[0]}..{moe_layers[-1]}")
        elif max(ids) >= num_experts:
            errors.append(f"adapter.routed_experts: layer {layer}: expert ids go up to {num_experts - 1}, got {max(ids)}")
    if errors:
        raise DsftError(*errors)
    return dict(spec.experts)
