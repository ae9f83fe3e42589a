"""Grouped matmuls over experts, and the frozen-weight autograd function built on them.

`grouped_mm(x, w, offs)`: rows of `x` are sorted by expert; rows offs[e-1]:offs[e] use w[e]
(w is [E, K, N]). torch's kernel needs bf16/fp16/fp32 and 16-byte-aligned strides; anything else
(float64 for gradcheck, odd LoRA ranks on CPU) takes a per-expert loop with the same result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_FAST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s, d in zip(t.stride(), t.shape) if s != 1 and d > 1)


def _fast_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if x.dtype not in _FAST_DTYPES or x.dtype != w.dtype or not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return _aligned(x) and _aligned(w)


def _loop_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    bounds = [0, *offs.tolist()]
    parts = [x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(w.shape[0])]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[-1])
    if _fast_ok(x, w):
        return F.grouped_mm(x, w, offs=offs)
    return _loop_mm(x, w, offs)


class FrozenExpertLinear(torch.autograd.Function):
    """y = x W_e^T per expert group, with W frozen.

    Forward and backward each call `weight_fn()` for W [E, out, in] (dequantizing NF4 into a reused
    buffer), and backward computes only the input gradient. No copy of W is kept between them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, offs: torch.Tensor, weight_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        ctx.weight_fn = weight_fn
        ctx.save_for_backward(offs)
        w = weight_fn()
        return grouped_mm(x.to(w.dtype), w.transpose(1, 2), offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (offs,) = ctx.saved_tensors
        w = ctx.weight_fn()
        return grouped_mm(grad.to(w.dtype).contiguous(), w, offs), None, None


def frozen_linear(x: torch.Tensor, offs: torch.Tensor, weight_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    return FrozenExpertLinear.apply(x, offs, weight_fn)
