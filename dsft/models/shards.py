"""The weights outside the routed experts of a model laid out by training.parallel, read as each rank's FSDP2 shard.

dsft.models.stream, asked to (`rest_later`), leaves every such parameter as a placeholder of its shape that holds
no memory (one zero, broadcast: `.to()` on its own device is a no-op, so the trainer can be built around it) and
records where it lives in the checkpoint (`defer`). The model then gets its adapter and its trainer; just before
its layout the placeholders become meta tensors (`to_meta`), which FSDP2 shards without memory (its meta-device
initialisation); `read_rest` then gives each rank's shard its memory and reads from the checkpoint only the rows of
dim 0 that the shard holds, as a safetensors slice:
- plain weights: those rows;
- block-scaled FP8 weights: those rows rounded out to whole scale blocks (under one block more at each end),
  dequantized;
- NF4 Linear4bit weights, whose packed codes FSDP2 shards on dim 0 (a rank holds a contiguous range of the
  flattened weight): the rows under its 64-element quantization blocks, quantized; the blocks' absmax are
  all-reduced so every rank builds the whole quantization state, double-quantized as bitsandbytes does, and codes
  and state equal quantizing the whole weight in one process, bit for bit.
A parameter that is not sharded (`read_rest` on a model not laid out) is read whole.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

SOURCE = "_dsft_source"  # on a module: {parameter name: (shard file, checkpoint key, FP8 block or None)}
DEVICE = "_dsft_device"  # on a module with a placeholder: the device the weight goes to
NF4_BLOCK = 64


def placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `shape` that holds one element: zero, broadcast."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def _params4bit(codes: torch.Tensor, module: nn.Module, quant_state: Any = None) -> nn.Parameter:
    """NF4 packed `codes` as `module`'s frozen bitsandbytes weight (already quantized: never quantized again)."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(codes, requires_grad=False, quant_state=quant_state, quant_type="nf4",
                             blocksize=NF4_BLOCK, compress_statistics=True, bnb_quantized=True, module=module)


def defer(module: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
          source: tuple[str, str, tuple[int, int] | None], nf4: bool) -> None:
    """`module.name` (a frozen parameter) a placeholder until `read_rest` reads it from `source`."""
    if nf4:
        module._parameters[name] = _params4bit(placeholder(((shape[0] * shape[1] + 1) // 2, 1), torch.uint8, device),
                                               module)
        module.dsft_nf4_shape = (tuple(shape), dtype)
    else:
        module._parameters[name] = nn.Parameter(placeholder(shape, dtype, device), requires_grad=False)
    module.__dict__.setdefault(SOURCE, {})[name] = source
    module.__dict__[DEVICE] = device


def to_meta(model: nn.Module) -> None:
    """Every placeholder of `model` a meta tensor of its shape (FSDP2 shards only contiguous or meta tensors)."""
    swap = {}
    for module in model.modules():
        for name in module.__dict__.get(SOURCE, {}):
            param = module._parameters[name]
            meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
            swap[id(param)] = param, (_params4bit(meta, module) if hasattr(module, "dsft_nf4_shape")
                                      else nn.Parameter(meta, requires_grad=False))
    _swap(model, swap)


def _swap(model: nn.Module, swap: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Each (old, new) of `swap` (keyed by the old one's id) put wherever the old one is: a tied weight (an LM head
    sharing the embeddings) follows its placeholder."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in swap and swap[id(param)][0] is param:
                module._parameters[name] = swap[id(param)][1]


def pending(model: nn.Module) -> int:
    """How many parameters of `model` are still placeholders."""
    return sum(len(module.__dict__.get(SOURCE, {})) for module in model.modules())


def read_rest(model: nn.Module) -> None:
    """Every placeholder of `model` read from the checkpoint: a sharded one (a DTensor) only its rows, in place; any
    other whole. Every rank calls it, with the same model (NF4 weights exchange their absmax)."""
    from safetensors import safe_open

    from torch.distributed.tensor import DTensor

    device = next((m.__dict__[DEVICE] for m in model.modules() if SOURCE in m.__dict__), None)
    if device is not None and any(isinstance(p, DTensor) and p.is_meta for p in model.parameters()):
        # FSDP2's meta-device initialisation (what to_empty does): memory for the local shards, on the load's device
        model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    swap = {}
    with ExitStack() as files:
        handles: dict[str, Any] = {}
        for module in model.modules():
            sources = module.__dict__.pop(SOURCE, None)
            for name, (file, key, block) in (sources or {}).items():
                if file not in handles:
                    handles[file] = files.enter_context(safe_open(file, framework="pt", device="cpu"))
                rows, param, target = _Rows(handles[file], key, block), module._parameters[name], module.__dict__[DEVICE]
                read = (_read_nf4(module, param, rows, target) if hasattr(module, "dsft_nf4_shape")
                        else _read_plain(param, rows, target))
                if read is not None:  # read whole: a new parameter, wherever the placeholder is
                    swap[id(param)] = param, read
    _swap(model, swap)


class _Rows:
    """Rows of dim 0 of one checkpoint tensor, read as a slice (FP8 blocks dequantized)."""

    def __init__(self, handle: Any, key: str, block: tuple[int, int] | None) -> None:
        self.handle, self.key, self.block = handle, key, block

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        part = self.handle.get_slice(self.key)
        if not part.get_dtype().startswith("F8"):
            return part[lo:hi]
        from dsft.models.fp8 import dequantize

        b0 = self.block[0]
        start, end = lo // b0 * b0, min(-(-hi // b0) * b0, part.get_shape()[0])
        scale = self.handle.get_slice(self.key + "_scale_inv")[start // b0:-(-end // b0)]
        return dequantize(part[start:end], scale, self.block)[lo - start:hi - start]


def _shard(param: torch.Tensor) -> tuple[torch.Tensor | None, int, int]:
    """(the local tensor to fill in place, or None for a parameter read whole; its first row; its rows)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(param, DTensor):
        return None, 0, param.shape[0]
    local = param.to_local()
    offset, coordinate = 0, param.device_mesh.get_coordinate()
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            offset += coordinate[dim] * -(-param.shape[0] // param.device_mesh.size(dim))
        elif not isinstance(placement, Replicate):
            raise RuntimeError(f"a placeholder sharded as {param.placements}: only dim 0 is read as a shard")
    return local, offset, local.shape[0]


def _read_plain(param: nn.Parameter, rows: _Rows, device: torch.device) -> nn.Parameter | None:
    """A sharded `param`'s rows read into its shard (None); else the whole weight read, as a new parameter on
    `device`."""
    local, lo, n = _shard(param)
    if local is None:
        return nn.Parameter(rows(0, n).to(device, param.dtype), requires_grad=False)
    if n:
        with torch.no_grad():
            local.copy_(rows(lo, lo + n))
    return None


def _read_nf4(module: nn.Module, param: nn.Parameter, rows: _Rows, device: torch.device) -> nn.Parameter | None:
    """The rank's packed codes (bytes lo..lo+n: elements 2lo..2(lo+n) of the flattened weight) from the rows under
    their quantization blocks, and the whole quantization state from every rank's blocks, set on `module` (as
    _read_plain: a sharded `param` filled in place, else a new one returned)."""
    import bitsandbytes.functional as F

    (out_features, in_features), dtype = module.dsft_nf4_shape
    numel = out_features * in_features
    local, lo, n = _shard(param)
    absmax = torch.zeros(-(-numel // NF4_BLOCK), dtype=torch.float32, device=device)
    codes = None
    if n:
        first, last = 2 * lo // NF4_BLOCK, -(-min(2 * (lo + n), numel) // NF4_BLOCK)  # its blocks
        start, end = first * NF4_BLOCK, min(last * NF4_BLOCK, numel)  # their elements
        top = start // in_features
        weight = rows(top, -(-end // in_features)).to(device, dtype).flatten()
        packed, state = F.quantize_4bit(weight[start - top * in_features:end - top * in_features], blocksize=NF4_BLOCK,
                                        compress_statistics=False, quant_type="nf4")
        absmax[first:last] = state.absmax.to(device)
        codes = packed[lo - start // 2:lo - start // 2 + n]
    if local is not None:
        import torch.distributed as dist

        dist.all_reduce(absmax, op=dist.ReduceOp.MAX)  # each block's absmax, from the rank(s) that quantized it
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    module.quant_state = F.QuantState(absmax=qabsmax, shape=torch.Size((out_features, in_features)), dtype=dtype,
                                      blocksize=NF4_BLOCK, code=F.get_4bit_type("nf4", device=device), quant_type="nf4",
                                      offset=offset, state2=state2)
    del module.dsft_nf4_shape
    if local is None:
        return _params4bit(codes, module, module.quant_state)
    if n:
        with torch.no_grad():
            local.copy_(codes)
    return None
