"""Fused expert weights stored as packed NF4 (bitsandbytes, blocksize 64, double quant).

The packed codes are a frozen uint8 parameter, so FSDP2 shards them across ranks like any weight and
all-gathers them around each layer's forward and backward; the small block scales (quant_state, about
3% of the codes) stay whole on every rank.

A fused tensor [E, out, in] is quantized in one call. Its 64-element blocks never straddle two
experts (each expert's slice is a whole number of blocks), so every expert keeps its own 4-bit codes
and block scales; double quantization then packs 256 block scales at a time.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCKSIZE = 64
_buffers: dict[tuple, torch.Tensor] = {}


def reusable_buffer(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One dequantization buffer per (shape, dtype, device), shared by every layer of that shape."""
    key = (tuple(shape), dtype, device)
    if key not in _buffers:
        _buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return _buffers[key]


class PackedNF4(nn.Module):
    """A frozen 3-D weight in NF4; `dequantize()` returns it in `dtype`."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        import bitsandbytes.functional as bnbf

        if weight.numel() % BLOCKSIZE or weight[0].numel() % BLOCKSIZE:
            raise ValueError(f"expert weight {tuple(weight.shape)} is not a whole number of {BLOCKSIZE}-element blocks per expert")
        packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True,
                                           quant_type="nf4", quant_storage=torch.uint8)
        # A frozen parameter, not a buffer: FSDP2 shards parameters only (a buffer would stay whole on
        # every rank). It is rebuilt from the base checkpoint, so state dicts leave it out.
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self.quant_state.dtype = dtype
        self.shape = weight.shape
        self.dtype = dtype

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - nn.Module's signature
        pass

    def _load_from_state_dict(self, state_dict, prefix, *args):  # noqa: ANN001 - nn.Module's signature
        state_dict.pop(prefix + "packed", None)

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        if self.packed.device.type == "cuda":  # bitsandbytes has no CPU kernel for the out= variant
            out = reusable_buffer(self.shape, self.dtype, self.packed.device)
            return bnbf.dequantize_4bit(self.packed, self.quant_state, out=out)
        return bnbf.dequantize_4bit(self.packed, self.quant_state).to(self.dtype)

    def nbytes(self) -> int:
        s = self.quant_state
        extra = s.absmax.numel() * s.absmax.element_size()
        if s.nested:
            extra += s.state2.absmax.numel() * 4
        return self.packed.numel() + extra

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, nf4, blocksize={BLOCKSIZE}, double_quant"
