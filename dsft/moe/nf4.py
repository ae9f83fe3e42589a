"""Fused expert weights stored as packed NF4 (bitsandbytes' 4-bit codes, blocksize 64, double quant),
every tensor per expert on dim 0.

An expert weight [E, out, in] is held as three frozen parameters, each with the expert first:
- `codes` uint8 [E, out*in/2]: two 4-bit NF4 codes a byte, 64-weight blocks (bitsandbytes' `quantize_4bit`);
- `scales` uint8 [E, P]: each block's absolute maximum, double-quantized to 8 bits in groups of 256 blocks
  that never straddle two experts (P: the expert's block count rounded up to 256);
- `scale_state` int32 [E, P/256 + 1]: the fp32 maximum of each group of 256, then the expert's offset (the
  mean of its block maxima), stored as int32 bit patterns so no dtype cast (`model.to(bf16)`, FSDP2's mixed
  precision) ever rounds them.

So an expert's weight depends on its own rows alone: slicing the experts (expert parallelism shards all
three on dim 0, FSDP2 shards them like any frozen parameter) gives exactly the slices' weights, and
quantizing a slice of the experts gives the same bytes as the whole layer's rows. `dequantize_experts` reads
local tensors only (what a rank holds under expert parallelism), in forward and in backward alike.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCKSIZE = 64
SCALE_GROUP = 256  # block maxima per 8-bit group (bitsandbytes' nested quantization)
_buffers: dict[tuple, torch.Tensor] = {}


def reusable_buffer(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One dequantization buffer per (shape, dtype, device), shared by every layer of that shape."""
    key = (tuple(shape), dtype, device)
    if key not in _buffers:
        _buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return _buffers[key]


def quantize_experts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[E, out, in] -> (codes uint8 [E, out*in/2], scales uint8 [E, P], scale_state int32 [E, P/256 + 1])."""
    import bitsandbytes.functional as bnbf

    experts = weight.shape[0]
    packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(weight.contiguous(), BLOCKSIZE, "nf4", torch.uint8)
    absmax = absmax.float().view(experts, -1)
    blocks = absmax.shape[1]
    padded = -(-blocks // SCALE_GROUP) * SCALE_GROUP
    offset = absmax.mean(1, keepdim=True)
    centred = torch.zeros(experts, padded, dtype=torch.float32, device=weight.device)
    centred[:, :blocks] = absmax - offset
    scales, state = bnbf.quantize_blockwise(centred.view(-1), blocksize=SCALE_GROUP)
    scale_state = torch.cat([state.absmax.float().view(experts, -1), offset], 1).contiguous()
    return packed.view(experts, -1), scales.view(experts, padded), scale_state.view(torch.int32)


def dequantize_experts(codes: torch.Tensor, scales: torch.Tensor, scale_state: torch.Tensor, shape: torch.Size,
                       dtype: torch.dtype) -> torch.Tensor:
    """The weight [e, out, in] of the e experts whose rows these are (`quantize_experts`' output, or rows of it)."""
    import bitsandbytes.functional as bnbf

    experts = codes.shape[0]
    state = scale_state.contiguous().view(torch.float32)
    group_max, offset = state[:, :-1].contiguous(), state[:, -1:]
    blocks = shape[1] * shape[2] // BLOCKSIZE
    absmax = bnbf.dequantize_blockwise(scales.reshape(-1), absmax=group_max.reshape(-1), blocksize=SCALE_GROUP)
    absmax = (absmax.view(experts, -1)[:, :blocks] + offset).reshape(-1)
    full = torch.Size([experts, *shape[1:]])
    quant_state = bnbf.QuantState(absmax=absmax, shape=full, dtype=dtype, blocksize=BLOCKSIZE,
                                  code=bnbf.get_4bit_type("nf4", device=codes.device), quant_type="nf4")
    flat = codes.reshape(-1, 1)
    if codes.device.type == "cuda":  # bitsandbytes has no CPU kernel for the out= variant
        return bnbf.dequantize_4bit(flat, quant_state, out=reusable_buffer(full, dtype, codes.device))
    return bnbf.dequantize_4bit(flat, quant_state).to(dtype)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rows this rank holds of a parameter that expert parallelism or FSDP2 made a DTensor (differentiable)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class PackedNF4(nn.Module):
    """A frozen expert weight [E, out, in] in NF4 (the module docstring's three tensors); `dequantize()`
    returns it in `dtype`."""

    PARTS = ("codes", "scales", "scale_state")

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        """`weight`: the experts [E, out, in] this module holds (all of a layer's, or a rank's block of them)."""
        super().__init__()
        if weight[0].numel() % BLOCKSIZE:
            raise ValueError(f"expert weight {tuple(weight.shape)} is not a whole number of {BLOCKSIZE}-element blocks per expert")
        self.shape = weight.shape
        self.dtype = dtype
        for name, tensor in zip(self.PARTS, quantize_experts(weight)):
            # Frozen parameters, not buffers: FSDP2 and expert parallelism shard parameters only (a buffer would
            # stay whole on every rank); frozen, so adapter files and adapter-only checkpoints leave them out.
            setattr(self, name, nn.Parameter(tensor, requires_grad=False))

    def local_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scales, scale_state) as this rank holds them: every expert, or (expert parallelism) its own,
        as local tensors."""
        return tuple(local(getattr(self, name)) for name in self.PARTS)

    @property
    def num_experts(self) -> int:
        """How many experts `dequantize()` returns: this rank's under expert parallelism, else all."""
        return local(self.codes).shape[0]

    def dequantize(self) -> torch.Tensor:
        return dequantize_experts(*self.local_parts(), self.shape, self.dtype)

    def reader(self):  # noqa: ANN201 - () -> torch.Tensor
        """A function that dequantizes the weight this rank holds now, for a forward and its backward: it keeps
        the local tensors it read (expert parallelism swaps them only around the forward)."""
        parts = self.local_parts()
        return lambda: dequantize_experts(*parts, self.shape, self.dtype)

    def nbytes(self) -> int:
        """Bytes this rank stores."""
        return sum(local(t).numel() * t.element_size() for t in self.local_parts())
