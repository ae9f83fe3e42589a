"""An adapter read back as per-tensor changes to the base checkpoint, in the checkpoint's own names.

- PEFT LoRA on nn.Linear `M`: `M.weight += s * B @ A`, s = alpha / r (rank/alpha patterns honoured).
- A router trained whole (`modules_to_save`): `M.weight` replaced.
- Expert LoRA / full experts on `P = model.layers.N.mlp.experts`: per selected expert e, onto the
  per-expert keys `P.e.gate_proj.weight`, `P.e.up_proj.weight`, `P.e.down_proj.weight`, or onto rows
  e of the fused `P.gate_up_proj` / `P.down_proj`, whichever layout the base uses.
- Checkpoint keys are read in the model's names (`dsft.arch.canonical`: Mixtral's
  `block_sparse_moe.experts.E.w1` is `mlp.experts.E.gate_proj`), so older layouts merge in place.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dsft.adapters.metadata import read_metadata
from dsft.errors import DsftError
from dsft.arch import FUSED, PER_EXPERT, canonical, layer_index, selects
from dsft.moe.lora import lora_scale

PREFIX = "base_model.model."


@dataclass
class Experts:
    ids: list[int]
    tensors: dict[str, torch.Tensor]  # lora_gate_up_A ... or lora_full_gate_up / lora_full_down
    scale: float

    @property
    def full(self) -> bool:
        return "lora_full_gate_up" in self.tensors


@dataclass
class Adapter:
    linear: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # base key -> A, B, s
    replace: dict[str, torch.Tensor] = field(default_factory=dict)
    experts: dict[str, Experts] = field(default_factory=dict)  # experts module -> its adapter
    nbytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def touches(self, key: str) -> bool:
        return selects(key, self.linear.keys() | self.replace.keys(), {m: e.ids for m, e in self.experts.items()})

    def targets(self) -> list[str]:
        return [*self.linear, *self.replace]


def _scale(module: str, rank: int, config: dict[str, Any]) -> float:
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(pattern, module) or re.match(rf"(.*\.)?{pattern}$", module):
            alpha = value
    return lora_scale(rank, alpha, bool(config.get("use_rslora")))


def read_adapter(adapter_dir: Path) -> Adapter:
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise DsftError(f"--adapter {adapter_dir}: no adapter_config.json / adapter_model.safetensors (safetensors only)")
    config = json.loads(config_path.read_text())
    weights = load_file(weights_path)
    meta = read_metadata(adapter_dir)
    adapter = Adapter(nbytes=sum(t.numel() * t.element_size() for t in weights.values()), meta=meta)
    routed = meta.get("routed_experts", {})
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        name = key.removeprefix(PREFIX)
        if ".lora_" not in name:
            if name.endswith(".weight"):  # a module trained whole (the router); its buffers are unchanged
                adapter.replace[name] = tensor
            continue
        module, _, part = name.partition(".lora_")
        by_module.setdefault(module, {})["lora_" + part.removesuffix(".weight") if module.endswith(".mlp.experts")
                                         else "lora_" + part] = tensor
    for module, parts in by_module.items():
        if module.endswith(".mlp.experts"):
            layer = str(layer_index(module))
            ids = routed.get("experts", {}).get(layer)
            if ids is None:
                raise DsftError(f"--adapter {adapter_dir}: expert weights for layer {layer} but no expert list in dsft_adapter.json")
            scale = lora_scale(routed.get("r", 1), routed.get("alpha", 1.0), bool(config.get("use_rslora")))
            adapter.experts[module] = Experts(ids, parts, scale)
        elif "lora_A.weight" in parts and "lora_B.weight" in parts:
            a, b = parts["lora_A.weight"], parts["lora_B.weight"]
            adapter.linear[module + ".weight"] = (a, b, _scale(module, a.shape[0], config))
        else:
            raise DsftError(f"--adapter {adapter_dir}: {module} has LoRA weights dsft cannot merge: {sorted(parts)}")
    return adapter


def merged(key: str, base: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """The merged value of base tensor `key` in fp32 (delta computed in fp32, rounded once by the caller)."""
    key = canonical(key)
    w = base.float().clone() if base.dtype == torch.float32 else base.float()
    if key in adapter.replace:
        return adapter.replace[key].float().clone()
    if key in adapter.linear:
        a, b, s = adapter.linear[key]
        delta = b.float() @ a.float()
        return w.add_(delta.mul_(s))  # in place: s * (B A) without a third full-size buffer
    m = PER_EXPERT.match(key) or FUSED.match(key)
    ex = adapter.experts[m.group("module")]
    if "expert" in m.groupdict():
        i = ex.ids.index(int(m.group("expert")))
        return _expert_part(w, ex, i, m.group("proj"))
    for i, e in enumerate(ex.ids):
        if m.group("proj") == "gate_up_proj":
            inter = w.shape[1] // 2
            _expert_part(w[e, :inter], ex, i, "gate_proj")
            _expert_part(w[e, inter:], ex, i, "up_proj")
        else:
            _expert_part(w[e], ex, i, "down_proj")
    return w


MERGE_ROWS = 512  # rows of a LoRA'd Linear merged at a time (a V3 o_proj is 7168 x 16384)


def merged_rows(key: str, base: torch.Tensor, adapter: Adapter, dtype: torch.dtype, rows: int = MERGE_ROWS,
                fp8: tuple[torch.Tensor, tuple[int, int]] | None = None) -> tuple[torch.Tensor, float, float] | None:
    """For a LoRA'd Linear: `merged(key, base, adapter)` rounded once to `dtype`, and the retention sums
    (retention_sums), computed a block of rows at a time, so that no full-size fp32
    base, result or delta is held. `fp8` (scale_inv, block): `base` is FP8, dequantized a block of rows at
    a time. The values are bit-equal to the whole-tensor computation (each element is the same length-r
    dot product, and dequantization is elementwise). None for any other key."""
    from dsft.models.fp8 import dequantize

    entry = adapter.linear.get(canonical(key))
    if entry is None or base.dim() != 2:
        return None
    a, b, s = entry
    a, b = a.float(), b.float()
    if fp8 is not None:  # whole scale tiles per block of rows
        rows = max(fp8[1][0], rows // fp8[1][0] * fp8[1][0])
    out = torch.empty(base.shape, dtype=dtype)
    dot = norm2 = 0.0
    for i in range(0, base.shape[0], rows):
        if fp8 is None:
            w = base[i:i + rows].float()
        else:
            scale, block = fp8
            w = dequantize(base[i:i + rows], scale[i // block[0]:-(-(i + rows) // block[0])], block)
        result = w + (b[i:i + rows] @ a).mul_(s)
        out[i:i + rows] = result
        block_dot, block_norm2 = retention_sums(w, result, out[i:i + rows])
        dot, norm2 = dot + block_dot, norm2 + block_norm2
    return out, dot, norm2


def retention_sums(base: torch.Tensor, result: torch.Tensor, written: torch.Tensor, rows: int = 1024) -> tuple[float, float]:
    """(<written - base, result - base>, |result - base|^2), a block of rows at a time so that no
    full-size temporary is made (the largest V3 weights are 117M values)."""
    dot = norm2 = 0.0
    base, result, written = (t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1) for t in (base, result, written))
    for i in range(0, base.shape[0], rows):
        b = base[i:i + rows].float()
        delta = result[i:i + rows].float() - b
        dot += float(torch.dot((written[i:i + rows].float() - b).flatten(), delta.flatten()))
        norm2 += float(torch.dot(delta.flatten(), delta.flatten()))
    return dot, norm2


def _expert_part(w: torch.Tensor, ex: Experts, i: int, proj: str) -> torch.Tensor:
    """Update one expert's gate_proj / up_proj / down_proj weight `w` in place and return it."""
    t = ex.tensors
    if proj == "down_proj":
        new = t["lora_full_down"][i] if ex.full else None
        delta = None if ex.full else ex.scale * (t["lora_down_B"][i].float() @ t["lora_down_A"][i].float())
    else:
        inter = w.shape[0]
        rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
        new = t["lora_full_gate_up"][i][rows] if ex.full else None
        delta = None if ex.full else ex.scale * (t["lora_gate_up_B"][i][rows].float() @ t["lora_gate_up_A"][i].float())
    return w.copy_(new.float()) if new is not None else w.add_(delta)
