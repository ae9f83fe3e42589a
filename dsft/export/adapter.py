"""An adapter's weight changes applied to base tensors, in the checkpoint's own names. The adapter is read
and checked by dsft.adapters.weights.read_adapter (the one reader: its scales are PEFT's).

- PEFT LoRA on nn.Linear `M`: `M.weight += s * B @ A`, s = alpha / r (rank/alpha patterns honoured).
- A router trained whole (`modules_to_save`): `M.weight` replaced.
- Expert LoRA / full experts on `P = model.layers.N.mlp.experts`: per selected expert e, onto the
  per-expert keys `P.e.gate_proj.weight`, `P.e.up_proj.weight`, `P.e.down_proj.weight`, or onto rows
  e of the fused `P.gate_up_proj` / `P.down_proj`, whichever layout the base uses.
- Checkpoint keys are read in the model's names (`dsft.arch.canonical`: Mixtral's
  `block_sparse_moe.experts.E.w1` is `mlp.experts.E.gate_proj`), so older layouts merge in place.
"""

from __future__ import annotations

import torch

from dsft.adapters.weights import Adapter, Experts
from dsft.arch import FUSED, PER_EXPERT, canonical
from dsft.moe.delta import expert_factors, lora_delta


def merged(key: str, base: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """The merged value of base tensor `key` in fp32 (delta computed in fp32, rounded once by the caller)."""
    key = canonical(key)
    w = base.float().clone() if base.dtype == torch.float32 else base.float()
    if key in adapter.replace:
        return adapter.replace[key].float().clone()
    if key in adapter.linear:
        a, b, s = adapter.linear[key]
        return w.add_(lora_delta(a, b, s))  # in place: s * (B A) without a third full-size buffer
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
        result = w + lora_delta(a, b[i:i + rows], s)
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
    if not ex.full:
        return w.add_(lora_delta(*expert_factors(t, i, proj), ex.scale))
    if proj == "down_proj":
        return w.copy_(t["lora_full_down"][i].float())
    inter = w.shape[0]
    return w.copy_(t["lora_full_gate_up"][i][slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)].float())
