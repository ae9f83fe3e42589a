"""A plain per-token reference of the experts math, with expert LoRA, for tests and gradchecks.

y_t = sum_k w_tk * down_e(act(gate_e(x_t)) * up_e(x_t)),  e = idx_tk, where for experts with LoRA
gate_up_e(x) = x W_e^T + s (x A_e^T) B_e^T, and likewise for down_e. Works in any dtype (float64).
"""

from __future__ import annotations

import torch
from torch import nn


def reference_experts(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_fn: nn.Module,
    lora: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """`lora` maps an expert id to (gate_up_A [r,H], gate_up_B [2I,r], down_A [r,I], down_B [H,r])."""
    lora = lora or {}
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            gu = gate_up[e] @ x[t]
            if e in lora:
                gu = gu + scale * (lora[e][1] @ (lora[e][0] @ x[t]))
            gate, up = gu.chunk(2)
            h = act_fn(gate) * up
            y = down[e] @ h
            if e in lora:
                y = y + scale * (lora[e][3] @ (lora[e][2] @ h))
            acc = acc + weights[t, k] * y
        rows.append(acc)
    return torch.stack(rows)
