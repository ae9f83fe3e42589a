"""`dsft_adapter.json`: what an adapter directory holds, beside PEFT's own files.

PEFT's adapter_config.json cannot say which experts of which layer carry LoRA, nor what base model the
adapter was trained on; this file does, and dsft reads it back for resume, eval and merge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from dsft.config.schema import AdapterSection
from dsft.models.arch import IDENTITY

FILENAME = "dsft_adapter.json"
FORMAT_VERSION = 1


def _group_spec(adapter: AdapterSection, group: str) -> dict[str, Any]:
    spec = getattr(adapter, group)
    return {"r": spec.r or adapter.r, "alpha": spec.alpha or adapter.alpha}


def build_metadata(model: nn.Module, adapter: AdapterSection, targets: dict[str, list[str]],
                   base_model: dict[str, Any]) -> dict[str, Any]:
    from dsft.moe.experts import layer_of
    from dsft.moe.lora import ExpertLoraLayer

    experts = {str(layer_of(n)): m.lora_experts["default"] for n, m in model.named_modules()
               if isinstance(m, ExpertLoraLayer) and "default" in m.lora_experts}
    groups = {g: {**_group_spec(adapter, g), "modules": names} for g, names in targets.items() if g != "routed_experts"}
    meta: dict[str, Any] = {"format": "dsft-adapter", "version": FORMAT_VERSION, "base_model": base_model, "groups": groups}
    if experts:
        meta["routed_experts"] = {**_group_spec(adapter, "routed_experts"), "mode": adapter.routed_experts.mode,
                                  "experts": experts}
    if adapter.router == "trainable":
        meta["router"] = "trainable"
    return meta


def write_metadata(adapter_dir: Path, meta: dict[str, Any]) -> None:
    (adapter_dir / FILENAME).write_text(json.dumps(meta, indent=2) + "\n")


def identity_mismatches(config: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """How a base config.json differs from the base an adapter recorded (architecture and shapes)."""
    recorded = meta.get("base_model", {})
    return [f"{k} {config.get(k)!r} (adapter: {recorded[k]!r})" for k in IDENTITY
            if recorded.get(k) is not None and config.get(k) != recorded[k]]


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / FILENAME
    return json.loads(path.read_text()) if path.is_file() else {}
