"""dsft's routed-experts module: a drop-in for transformers' fused experts
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) with frozen bf16/fp32 or NF4 weights, grouped
matmuls, and an optional low-rank path per expert (expert LoRA, see dsft.moe.lora).

Forward: sort the (token, expert) pairs by expert, run the experts as grouped matmuls, weight by the
router's scores and add back per token, exactly as transformers' eager loop does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dsft.moe.fused import is_silu, silu_mul
from dsft.moe.grouped import frozen_linear, grouped_mm
from dsft.moe.nf4 import PackedNF4, local


@dataclass
class ExpertDelta:
    """One adapter's low-rank terms, expanded to all E experts (zeros where an expert has none).

    gate_up: A [E, r, H], B [E, 2I, r]; down: A [E, r, I], B [E, H, r]; scale = alpha / r.
    """

    gate_up_A: torch.Tensor
    gate_up_B: torch.Tensor
    down_A: torch.Tensor
    down_B: torch.Tensor
    scale: float


@dataclass
class ExpertReplacement:
    """Trained full weights for some experts (ESFT's `mode: full`): index [n] of those experts,
    gate_up [n, 2I, H], down [n, H, I]. They replace the base weights of those experts."""

    index: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class GatherRows(torch.autograd.Function):
    """x[order // k]: each token's row once per routed expert, in expert-sorted order.

    Backward un-sorts with a permutation copy and sums each token's k rows, where autograd's indexing
    backward would accumulate with atomic adds."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (order,) = ctx.saved_tensors
        full = grad.new_empty(grad.shape).index_copy_(0, order, grad)
        return full.view(-1, ctx.k, grad.shape[-1]).sum(1), None, None


def replaced(x: torch.Tensor, base: torch.Tensor, new: torch.Tensor, index: torch.Tensor,
             rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (W_new - W_base)^T on the rows routed to the replaced experts; the frozen path already added x W_base^T."""
    delta = new.to(x.dtype) - base[index].detach()
    return grouped_mm(x[rows], delta.transpose(1, 2), offs)


def low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (x A_e^T) B_e^T per expert group; W + BA is never formed. The scale is folded into the
    small B rather than applied to the [tokens, out] result."""
    A, B = A.to(x.dtype), (B * scale).to(x.dtype)
    return grouped_mm(grouped_mm(x, A.transpose(1, 2), offs), B.transpose(1, 2), offs)


class DsftExperts(nn.Module):
    """Routed experts with frozen weights held as parameters (`quantized=False`) or packed NF4."""

    ep_size = 1  # ranks its experts are split over (dsft.moe.parallel sets it)
    first_expert = 0  # the layer's id of its first row, and how many the layer has in all, when it was
    global_experts: int | None = None  # loaded holding only a slice of them (`hold_rows`)

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module, quantized: bool,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or gate_up.dtype
        _, two_i, self.hidden_dim = gate_up.shape
        self.intermediate_dim = two_i // 2
        self.act_fn = act_fn
        self.quantized = quantized
        self.compute_dtype = dtype
        if quantized:
            self.gate_up_nf4 = PackedNF4(gate_up, dtype)
            self.down_nf4 = PackedNF4(down, dtype)
        else:
            self.gate_up_proj = nn.Parameter(gate_up.to(dtype), requires_grad=False)
            self.down_proj = nn.Parameter(down.to(dtype), requires_grad=False)

    @classmethod
    def from_module(cls, experts: nn.Module, quantized: bool, dtype: torch.dtype | None = None) -> "DsftExperts":
        """Take the weights of a transformers fused-experts module (`@use_experts_implementation`)."""
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
            raise ValueError(f"{type(experts).__name__}: experts with biases or transposed weights are not supported yet")
        return cls(experts.gate_up_proj.data, experts.down_proj.data, experts.act_fn, quantized, dtype)

    def hold_rows(self, first: int, total: int) -> None:
        """Its weights are the layer's experts first.. (of `total`): the rows expert parallelism gives this rank,
        loaded alone (dsft.models.stream)."""
        self.first_expert, self.global_experts = first, total
        if self.quantized:  # the layer's shape, as when the rows are split from a whole layer
            for store in (self.gate_up_nf4, self.down_nf4):
                store.shape = torch.Size([total, *store.shape[1:]])

    @property
    def all_experts(self) -> int:
        """The layer's routed experts, wherever they are held."""
        return self.global_experts or self.num_experts

    @property
    def num_experts(self) -> int:
        """The experts this module runs: this rank's under expert parallelism (dsft.moe.parallel), which hands it
        local expert ids; else all of the layer's."""
        return self.gate_up_nf4.num_experts if self.quantized else local(self.gate_up_proj).shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """A tensor on the experts' device (PEFT places adapter weights next to `weight`)."""
        return self.gate_up_nf4.codes if self.quantized else self.gate_up_proj

    def gate_up_weight(self) -> torch.Tensor:
        return self.gate_up_nf4.dequantize() if self.quantized else local(self.gate_up_proj)

    def down_weight(self) -> torch.Tensor:
        return self.down_nf4.dequantize() if self.quantized else local(self.down_proj)

    def _readers(self) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
        """(gate_up, down) weight functions over the tensors this rank holds now, which backward calls again
        after expert parallelism has swapped its local tensors back for the sharded ones."""
        if self.quantized:
            return self.gate_up_nf4.reader(), self.down_nf4.reader()
        gate_up, down = local(self.gate_up_proj), local(self.down_proj)
        return (lambda: gate_up), (lambda: down)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                deltas: tuple[ExpertDelta, ...] = (), replacements: tuple[ExpertReplacement, ...] = ()) -> torch.Tensor:
        num_top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # scatter_add, not bincount: bincount reads the max id back to the host, a sync in every layer
        counts = torch.zeros(self.num_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)

        x = GatherRows.apply(hidden_states, order, num_top_k).to(self.compute_dtype)
        gate_up_weight, down_weight = self._readers()
        gate_up = frozen_linear(x, offs, gate_up_weight)
        for d in deltas:
            gate_up = gate_up + low_rank(x, d.gate_up_A, d.gate_up_B, offs, d.scale)
        rows = [self._rows(flat[order], counts, r.index) for r in replacements]
        for r, (sel, sub_offs) in zip(replacements, rows):
            gate_up = gate_up.index_add(0, sel, replaced(x, gate_up_weight(), r.gate_up, r.index, sel, sub_offs))
        gate, up = gate_up.chunk(2, dim=-1)
        # The router's weight scales h, not the output: down_proj is linear, and h is the narrower tensor.
        weight = top_k_weights.reshape(-1)[order].unsqueeze(-1).to(up.dtype)
        h = silu_mul(gate, up, weight) if is_silu(self.act_fn) else self.act_fn(gate) * up * weight
        out = frozen_linear(h, offs, down_weight)
        for d in deltas:
            out = out + low_rank(h, d.down_A, d.down_B, offs, d.scale)
        for r, (sel, sub_offs) in zip(replacements, rows):
            out = out.index_add(0, sel, replaced(h, down_weight(), r.down, r.index, sel, sub_offs))
        # Back to (token, k) order with a permutation copy, then sum over k: no atomic index_add.
        unsorted = out.new_empty(out.shape).index_copy_(0, order, out)
        return unsorted.view(*top_k_index.shape, -1).sum(1).to(hidden_states.dtype)

    def _rows(self, sorted_ids: torch.Tensor, counts: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (in expert-sorted order) routed to the experts in `index`, and their group offsets."""
        chosen = torch.zeros(self.num_experts, dtype=torch.bool, device=sorted_ids.device)
        chosen[index] = True
        rows = chosen[sorted_ids].nonzero().squeeze(1)
        return rows, torch.cumsum(counts[index], 0, dtype=torch.int32)

    def extra_repr(self) -> str:
        kind = "nf4" if self.quantized else str(self.compute_dtype).removeprefix("torch.")
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, {kind}"


def is_fused_experts(module: nn.Module) -> bool:
    w = getattr(module, "gate_up_proj", None)
    return isinstance(w, torch.Tensor) and w.dim() == 3 and isinstance(getattr(module, "down_proj", None), torch.Tensor)


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every routed-experts module (transformers' fused ones or dsft's), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DsftExperts) or is_fused_experts(m)}


def replace_experts(model: nn.Module, quantized: bool, dtype: torch.dtype | None = None) -> int:
    """Swap every fused-experts module of a loaded model for DsftExperts; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if is_fused_experts(module) and not isinstance(module, DsftExperts):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, DsftExperts.from_module(module, quantized, dtype))
            count += 1
    return count


def layer_of(name: str) -> int:
    """The decoder layer index in a module name such as `model.layers.3.mlp.experts`."""
    from dsft.arch import layer_index

    return layer_index(name)
