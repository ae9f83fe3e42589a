"""Fused expert weights stored as packed NF4 (bitsandbytes, blocksize 64, double quant).

The packed codes are a frozen uint8 parameter, so FSDP2 shards them across ranks like any weight and
all-gathers them around each layer's forward and backward. With `sharded=True` (recipe
`model.shard_experts`) dsft splits them itself as they are loaded: each rank keeps 1/world of the codes
and gathers a layer's codes when it dequantizes them, so a model whose NF4 experts do not fit on one GPU
(DeepSeek-V3) never exists whole on any rank, and plain DDP trains it. Either way the small block scales
(quant_state, about 3% of the codes) stay whole on every rank.

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


_group: list = []


def codes_group():  # noqa: ANN201 - a torch.distributed ProcessGroup
    """The process group for gathering expert codes: its own communicator, so the gathers never queue
    behind (or ahead of) DDP's gradient all-reduces on the default group. Created by every rank on the
    first sharded layer, which every rank loads at the same point."""
    import torch.distributed as dist

    if not _group:
        _group.append(dist.new_group(backend=dist.get_backend()))
    return _group[0]


def _my_slice(flat: torch.Tensor) -> torch.Tensor:
    """This rank's equal share of `flat` (zero-padded at the end), a copy that owns its memory."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    per = -(-flat.numel() // world)
    local = flat.new_zeros(per)
    part = flat[rank * per:(rank + 1) * per]
    local[:part.numel()] = part
    return local


class PackedNF4(nn.Module):
    """A frozen 3-D weight in NF4; `dequantize()` returns it in `dtype`."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, sharded: bool = False) -> None:
        super().__init__()
        import bitsandbytes.functional as bnbf

        if weight.numel() % BLOCKSIZE or weight[0].numel() % BLOCKSIZE:
            raise ValueError(f"expert weight {tuple(weight.shape)} is not a whole number of {BLOCKSIZE}-element blocks per expert")
        packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True,
                                           quant_type="nf4", quant_storage=torch.uint8)
        self.packed_shape = packed.shape
        self.sharded = sharded
        if sharded:
            # A plain attribute: DDP, FSDP and state dicts leave this rank's slice alone.
            codes_group()
            self.local_codes = _my_slice(packed.view(-1))
            del packed
        else:
            # A frozen parameter, not a buffer: FSDP2 shards parameters only (a buffer would stay whole
            # on every rank). Frozen, so adapter files and adapter-only checkpoints leave it out.
            self.packed = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self.quant_state.dtype = dtype
        self.shape = weight.shape
        self.dtype = dtype

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        super()._apply(fn, recurse)
        if self.sharded:
            self.local_codes = fn(self.local_codes)
        self.quant_state.to(self.stored.device)
        return self

    @property
    def stored(self) -> torch.Tensor:
        """The codes this rank holds: all of them, or its slice when sharded."""
        return self.local_codes if self.sharded else self.packed

    def codes(self) -> torch.Tensor:
        """All the packed codes; when sharded, gathered from every rank (a collective)."""
        if not self.sharded:
            return self.packed
        import torch.distributed as dist

        local = self.local_codes
        full = reusable_buffer(torch.Size([local.numel() * dist.get_world_size()]), torch.uint8, local.device)
        dist.all_gather_into_tensor(full, local, group=codes_group())
        return full[:self.packed_shape.numel()].view(self.packed_shape)

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        codes = self.codes()
        if codes.device.type == "cuda":  # bitsandbytes has no CPU kernel for the out= variant
            out = reusable_buffer(self.shape, self.dtype, codes.device)
            return bnbf.dequantize_4bit(codes, self.quant_state, out=out)
        return bnbf.dequantize_4bit(codes, self.quant_state).to(self.dtype)

    def nbytes(self) -> int:
        s = self.quant_state
        extra = s.absmax.numel() * s.absmax.element_size()
        if s.nested:
            extra += s.state2.absmax.numel() * 4
        return self.stored.numel() + extra

    def extra_repr(self) -> str:
        shard = ", codes sharded across ranks" if self.sharded else ""
        return f"shape={tuple(self.shape)}, nf4, blocksize={BLOCKSIZE}, double_quant{shard}"
