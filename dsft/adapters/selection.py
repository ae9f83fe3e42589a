"""Which routed experts are adapted: an explicit list checked against the model's config, or a
policy applied to the routing profile (DeepSeek's ESFT selection)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsft.config.schema import AdapterSection, RoutedExperts
from dsft.errors import DsftError
from dsft import arch

KEY = "adapter.routed_experts"


def moe_layout(config: dict[str, Any]) -> tuple[list[int], int]:
    """(indices of the layers with routed experts, experts per layer) from a config.json dict."""
    return arch.moe_layers(config), arch.num_experts(config)


def read_config(model_path: Path) -> dict[str, Any]:
    return json.loads((model_path / "config.json").read_text())


def check_groups(adapter: AdapterSection, config: dict[str, Any]) -> None:
    """Groups the recipe asks for by name that this model does not have (a dense model: shared experts, a
    trainable router). Defaults never fail: only keys given in the recipe file or with --set."""
    errors = []
    dense = not arch.moe_layers(config)
    kind = config.get("model_type")
    if "shared_experts" in adapter.model_fields_set and adapter.shared_experts.enabled and not arch.shared_intermediate(config):
        errors.append(f"adapter.shared_experts: this {kind} model has no shared experts; remove the key")
    if adapter.router == "trainable" and dense:
        errors.append(f"adapter.router: this {kind} model has no router; remove the key")
    if errors:
        raise DsftError(*errors)


def check_spec(spec: RoutedExperts, config: dict[str, Any]) -> dict[int, list[int] | None] | None:
    """Static selection (layer -> ids, None for all experts), `{}` for none, or None when a policy
    decides after profiling. Every mismatch with the model is reported at once."""
    if not spec.enabled:
        return {}
    moe_layers, num_experts = moe_layout(config)
    if not moe_layers:
        raise DsftError(f"{KEY}: this model has no routed experts; set routed_experts: none")
    errors = []
    if spec.policy is not None:
        if spec.min_per_layer > num_experts:
            errors.append(f"{KEY}.min_per_layer: the model has {num_experts} experts per layer, got {spec.min_per_layer}")
        if errors:
            raise DsftError(*errors)
        return None
    if spec.experts == "all":
        return dict.fromkeys(moe_layers)
    for layer, ids in spec.experts.items():
        if layer not in moe_layers:
            errors.append(f"{KEY}: layer {layer} has no routed experts; MoE layers are {moe_layers[0]}..{moe_layers[-1]}")
        elif max(ids) >= num_experts:
            errors.append(f"{KEY}: layer {layer}: expert ids go up to {num_experts - 1}, got {max(ids)}")
    if errors:
        raise DsftError(*errors)
    return dict(spec.experts)


def select_by_policy(spec: RoutedExperts, profile: dict[str, Any]) -> dict[int, list[int]]:
    """Per layer, the fewest experts (highest score first, ties by id) whose share of the layer's
    total score reaches `top_p`, clamped to [min_per_layer, max_per_layer]."""
    key = "gate_sum" if spec.policy == "gate_score" else "counts"
    selection: dict[int, list[int]] = {}
    for layer, d in sorted(profile["layers"].items(), key=lambda kv: int(kv[0])):
        scores = [float(x) for x in d[key]]
        total = sum(scores)
        order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
        take, acc = 0, 0.0
        if total > 0:
            for e in order:
                take += 1
                acc += scores[e] / total
                if acc >= spec.top_p - 1e-12:
                    break
        take = max(take, spec.min_per_layer)
        if spec.max_per_layer is not None:
            take = min(take, spec.max_per_layer)
        if take:
            selection[int(layer)] = sorted(order[:take])
    if not selection:
        raise DsftError(f"{KEY}: the {spec.policy} policy selected no expert in any layer "
                        f"(no profiled tokens?); raise min_per_layer or check data and data.assistant_only_loss")
    return selection
