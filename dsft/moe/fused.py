"""Fewer passes over memory in a training step: fused elementwise chains and LoRA as one GEMM.

Measured on an H100 (docs/performance.md), a third of a DeepSeek-V2-Lite LoRA step was elementwise
work between the matmuls: RMSNorm's fp32 chain, SiLU-and-multiply, PEFT's `lora_B(lora_A(x)) * scaling`
followed by a separate add (and, for 4-bit layers, a defensive clone). Here:

- `silu_mul` and `rms_norm` run as single fused kernels (torch.compile) on CUDA, eagerly elsewhere;
- `fuse_lora_linears` makes PEFT's Linear/Linear4bit LoRA add `scaling * (x A^T) B^T` into the base output
  inside one `addmm`, for the common case (one active adapter, no dropout, no DoRA); anything else takes
  PEFT's own forward.

All of it computes what transformers and PEFT compute (tests compare them); `DSFT_COMPILE=0` turns the
compiled kernels off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_compiled: dict[Callable, Callable] = {}
_broken: set[Callable] = set()
_BACKEND = "inductor"
log = logging.getLogger(__name__)


def _compile_enabled() -> bool:
    if os.environ.get("DSFT_COMPILE", "1") == "0":
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def _wants_compile(t: torch.Tensor) -> bool:
    return t.is_cuda and _compile_enabled()


def _is_compile_error(err: Exception) -> bool:
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    return isinstance(err, (TorchDynamoException, FailOnRecompileLimitHit))


def _on_gpu(fn: Callable) -> Callable:
    """`fn` compiled into fused kernels for CUDA tensors (once, lazily); the eager `fn` anywhere else.

    Compiled with dynamic shapes and without `fullgraph`: one training run calls these with many token
    counts, dtypes and grad modes (training, eval, DPO's reference pass), and `fullgraph=True` turns
    dynamo's recompile limit into a hard error. Should compiling fail at all, `fn` runs eagerly from then on.
    """

    def run(first: torch.Tensor, *args: Any) -> torch.Tensor:
        if fn not in _broken and _wants_compile(first):
            if fn not in _compiled:
                _compiled[fn] = torch.compile(fn, dynamic=True, backend=_BACKEND)
            try:
                return _compiled[fn](first, *args)
            except Exception as err:
                if not _is_compile_error(err):
                    raise
                _broken.add(fn)
                log.warning("torch.compile failed for %s, running it eagerly: %s",
                            fn.__name__, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return fn(first, *args)

    run.__doc__ = fn.__doc__
    return run


def _silu_mul(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    out = F.silu(gate) * up
    return out if scale is None else out * scale


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama/DeepSeek RMSNorm: normalise in fp32, round to x's dtype, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


silu_mul_fused = _on_gpu(_silu_mul)
rms_norm = _on_gpu(_rms_norm)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up (* scale), in one kernel on CUDA."""
    return silu_mul_fused(gate, up, scale)


def _rms_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") \
        and isinstance(getattr(module, "weight", None), torch.Tensor)


def _is_swiglu_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) \
        and is_silu(getattr(module, "act_fn", None)) and type(module).__name__.endswith("MLP")


def _lora_fast_path(self: nn.Module, kwargs: dict) -> str | None:
    """The one active adapter when PEFT's forward would be plain `base(x) + scaling * B(A(x))`."""
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return None
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1 or active[0] in self.lora_variant:
        return None
    name = active[0]
    if not isinstance(self.lora_dropout[name], nn.Identity) or not isinstance(self.lora_A[name], nn.Linear):
        return None
    return name


def _lora_linear_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _lora_fast_path(self, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    if getattr(self, "cast_input_dtype_enabled", True):
        x = x.to(self.lora_A[name].weight.dtype)
    xa = self.lora_A[name](x)
    B = self.lora_B[name].weight
    flat = result.reshape(-1, result.shape[-1])
    if not torch.is_autocast_enabled(x.device.type):
        dtype = torch.promote_types(flat.dtype, xa.dtype)
        flat, xa, B = flat.to(dtype), xa.to(dtype), B.to(dtype)
    out = torch.addmm(flat, xa.reshape(-1, xa.shape[-1]), B.t(), alpha=self.scaling[name])
    return out.view(*result.shape[:-1], out.shape[-1]).to(result.dtype)


def fuse_lora_linears(model: nn.Module) -> int:
    """Route PEFT's LoRA Linear / Linear4bit layers through `_lora_linear_forward`; returns how many."""
    from peft.tuners.lora.layer import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and type(module).__name__ in ("Linear", "Linear4bit") \
                and isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            module.forward = MethodType(_lora_linear_forward, module)
            count += 1
    return count


def fuse(model: nn.Module) -> dict[str, int]:
    """Every speed-up above on `model` (a PEFT model or a plain one); counts of what was changed."""
    counts = {"rms_norm": 0, "swiglu_mlp": 0}
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = MethodType(_rms_forward, module)
            counts["rms_norm"] += 1
        elif _is_swiglu_mlp(module):
            module.forward = MethodType(_mlp_forward, module)
            counts["swiglu_mlp"] += 1
    counts["lora_linear"] = fuse_lora_linears(model)
    return counts


def autocast_for(model: torch.nn.Module):
    """Autocast to the base's half precision (LoRA masters are fp32 and dsft feeds them half-precision
    inputs, see dsft.adapters.lora.half_precision_inputs); a no-op for fp32 bases."""
    import contextlib

    dtype = next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)
    if dtype is None:
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=dtype)
