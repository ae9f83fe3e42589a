"""Fused expert weights stored as packed NF4 (bitsandbytes, blocksize 64, double quant).

The packed codes are a frozen uint8 parameter, so FSDP2 shards them across ranks like any weight and
all-gathers them around each layer's forward and backward. With `model.shard_experts` dsft splits them
itself as they are loaded: each rank reads and quantizes only its 1/world of each layer's experts,
keeps those codes, and gathers the layer's codes when it dequantizes them, so a model whose NF4 experts
do not fit on one GPU (DeepSeek-V3) never exists whole on any rank, and plain DDP trains it. Either way
the small block scales (quant_state, about 3% of the codes) stay whole on every rank.

A fused tensor [E, out, in] is quantized in one call. Its 64-element blocks never straddle two
experts (each expert's slice is a whole number of blocks), so every expert keeps its own 4-bit codes
and block scales; double quantization then packs 256 block scales at a time.
"""

from __future__ import annotations

from typing import Any

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


def expert_range(num_experts: int) -> tuple[int, int, int]:
    """This rank's experts [lo, hi) when codes are sharded, and the per-rank count (the last ranks may
    hold fewer, padded to it)."""
    import torch.distributed as dist

    per = -(-num_experts // dist.get_world_size())
    lo = min(num_experts, dist.get_rank() * per)
    return lo, min(num_experts, lo + per), per


def _quantize_sharded(local: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, Any]:
    """This rank's experts [e, out, in] -> (its padded slice of the layer's NF4 codes, the whole layer's
    QuantState). The 4-bit codes of a 64-weight block depend on that block alone; double quantization
    needs every block's scale, so the fp32 scales are gathered and compressed as bitsandbytes'
    `quantize_4bit` does. The result is bit-identical to quantizing the whole layer on one process."""
    import bitsandbytes.functional as bnbf
    import torch.distributed as dist

    _, out_dim, in_dim = local.shape
    lo, hi, per = expert_range(num_experts)
    codes_per_expert, blocks_per_expert = out_dim * in_dim // 2, out_dim * in_dim // BLOCKSIZE
    codes = torch.zeros(per * codes_per_expert, dtype=torch.uint8, device=local.device)
    absmax = torch.zeros(per * blocks_per_expert, dtype=torch.float32, device=local.device)
    if hi > lo:
        packed, scales = torch.ops.bitsandbytes.quantize_4bit.default(local.contiguous(), BLOCKSIZE, "nf4", torch.uint8)
        codes[:packed.numel()] = packed.view(-1)
        absmax[:scales.numel()] = scales
    every = absmax.new_empty(absmax.numel() * dist.get_world_size())
    dist.all_gather_into_tensor(every, absmax, group=codes_group())
    every = every.view(dist.get_world_size(), per, blocks_per_expert).flatten(0, 1)[:num_experts].reshape(-1)
    offset = every.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(every - offset, blocksize=256)
    state = bnbf.QuantState(absmax=qabsmax, shape=torch.Size([num_experts, out_dim, in_dim]), dtype=local.dtype,
                            blocksize=BLOCKSIZE, code=bnbf.get_4bit_type("nf4", device=local.device),
                            quant_type="nf4", offset=offset, state2=state2)
    return codes, state


class PackedNF4(nn.Module):
    """A frozen 3-D weight in NF4; `dequantize()` returns it in `dtype`."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, num_experts: int | None = None) -> None:
        """`weight`: all experts [E, out, in]; or, with `num_experts` (sharded codes), this rank's
        experts (`expert_range`), every rank calling at the same point."""
        super().__init__()
        import bitsandbytes.functional as bnbf

        if weight[0].numel() % BLOCKSIZE:
            raise ValueError(f"expert weight {tuple(weight.shape)} is not a whole number of {BLOCKSIZE}-element blocks per expert")
        self.sharded = num_experts is not None
        self.shape = torch.Size([num_experts or weight.shape[0], *weight.shape[1:]])
        self.packed_shape = torch.Size([self.shape.numel() // 2, 1])
        if self.sharded:
            # A plain attribute: DDP, FSDP and state dicts leave this rank's slice alone.
            self.local_codes, state = _quantize_sharded(weight, num_experts)
        else:
            packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True,
                                               quant_type="nf4", quant_storage=torch.uint8)
            # A frozen parameter, not a buffer: FSDP2 shards parameters only (a buffer would stay whole
            # on every rank). Frozen, so adapter files and adapter-only checkpoints leave it out.
            self.packed = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self.quant_state.dtype = dtype
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
        return full[:self.packed_shape.numel()].view(self.packed_shape)  # ranks' slices are in expert order

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
