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
from dsft.outputs import write_atomic

FILENAME = "dsft_adapter.json"
FORMAT_VERSION = 1


def _group_spec(adapter: AdapterSection, group: str) -> dict[str, Any]:
    r, alpha = adapter.rank_alpha(group)
    return {"r": r, "alpha": alpha}


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


def recorded_targets(meta: dict[str, Any]) -> dict[str, list[str]]:
    """The modules an adapter's metadata says it trains, by group (as attach_lora returns them)."""
    from dsft.arch import experts_module

    targets = {g: v["modules"] for g, v in meta.get("groups", {}).items()}
    if "routed_experts" in meta:
        targets["routed_experts"] = [experts_module(int(layer)) for layer in meta["routed_experts"]["experts"]]
    return targets


def write_metadata(adapter_dir: Path, meta: dict[str, Any]) -> None:
    write_atomic(adapter_dir / FILENAME, json.dumps(meta, indent=2) + "\n")


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    from dsft.outputs import read_json

    path = Path(adapter_dir) / FILENAME
    return read_json(path, "the adapter is damaged: train it again or restore the file") if path.is_file() else {}
