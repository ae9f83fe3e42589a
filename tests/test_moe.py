"""MoE-native experts: equal to transformers' eager experts, NF4 storage, expert LoRA math and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsft.moe.experts import DsftExperts, ExpertDelta
from dsft.moe.grouped import grouped_mm
from moe_reference import reference_experts
from dsft.models.load import resolve_model_path


def _eager(name: str, dtype: torch.dtype = torch.float32):
    path = resolve_model_path(f"builtin:{name}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")


def _routing(tokens: int, experts: int = 8, k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    return torch.randn(tokens, 64, generator=g), idx, torch.rand(tokens, k, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-deepseek-v2"])
def test_experts_equal_transformers_eager(name: str) -> None:
    eager = _eager(name).model.layers[1].mlp.experts
    x, idx, w = _routing(50)
    assert _rel(DsftExperts.from_module(eager, quantized=False)(x, idx, w), eager(x, idx, w)) <= 1e-5

    bf = copy.deepcopy(eager).to(torch.bfloat16)
    ours = DsftExperts.from_module(bf, quantized=False)(x.bfloat16(), idx, w.bfloat16())
    ref = bf(x.bfloat16(), idx, w.bfloat16())
    assert _rel(ours, ref) <= 1e-2  # bf16 rounding: both round each product differently


def test_nf4_experts_equal_eager_on_dequantized_weights() -> None:
    eager = _eager("tiny-deepseek-v3").model.layers[2].mlp.experts
    nf4 = DsftExperts.from_module(eager, quantized=True)
    assert nf4.gate_up_nf4.packed.dtype == torch.uint8
    assert nf4.gate_up_nf4.nbytes() < eager.gate_up_proj.numel() * 4 / 6  # ~4.5 bits per weight vs 32
    dequant = copy.deepcopy(eager)
    dequant.gate_up_proj.data = nf4.gate_up_nf4.dequantize()
    dequant.down_proj.data = nf4.down_nf4.dequantize()
    x, idx, w = _routing(40, seed=1)
    assert _rel(nf4(x, idx, w), dequant(x, idx, w)) <= 1e-5
    assert 0.01 < _rel(dequant.gate_up_proj, eager.gate_up_proj) < 0.15  # it really is 4-bit


def _lora_tensors(n: int, r: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(n, r, 64), (n, 64, r), (n, r, 32), (n, 64, r)]
    return [(torch.randn(s, generator=g) * 0.3).to(dtype).requires_grad_() for s in shapes]


def test_expert_lora_reference_gradcheck_float64() -> None:
    eager = _eager("tiny-deepseek-v3").model.layers[1].mlp.experts
    gate_up, down = eager.gate_up_proj.detach().double(), eager.down_proj.detach().double()
    x, idx, w = _routing(5, seed=2)
    x = x.double().requires_grad_()
    lora = _lora_tensors(2, 4, torch.float64)

    def f(x, *ab):
        selected = {1: tuple(t[0] for t in ab), 5: tuple(t[1] for t in ab)}
        return reference_experts(x, idx, w.double(), gate_up, down, eager.act_fn, selected, scale=0.5)

    assert torch.autograd.gradcheck(f, (x, *lora))


def test_grouped_lora_gradients_match_reference() -> None:
    eager = _eager("tiny-deepseek-v3").model.layers[1].mlp.experts
    experts = DsftExperts.from_module(eager, quantized=False)
    selected = torch.tensor([1, 5])
    x, idx, w = _routing(60, seed=3)
    ours_x, ref_x = x.clone().requires_grad_(), x.double().requires_grad_()
    ours_ab, ref_ab = _lora_tensors(2, 4, torch.float32), _lora_tensors(2, 4, torch.float64)

    full = [t.new_zeros(8, *t.shape[1:]).index_copy(0, selected, t) for t in ours_ab]
    out = experts(ours_x, idx, w, deltas=(ExpertDelta(*full, scale=0.5),))
    ref = reference_experts(ref_x, idx, w.double(), eager.gate_up_proj.detach().double(), eager.down_proj.detach().double(),
                            eager.act_fn, {1: tuple(t[0] for t in ref_ab), 5: tuple(t[1] for t in ref_ab)}, scale=0.5)
    assert _rel(out, ref) <= 1e-5
    probe = torch.randn_like(ref)
    (out * probe.float()).sum().backward()
    (ref * probe).sum().backward()
    assert _rel(ours_x.grad, ref_x.grad) <= 1e-5
    for ours, theirs in zip(ours_ab, ref_ab):
        assert _rel(ours.grad, theirs.grad) <= 1e-5


def test_grouped_mm_fallback_matches_kernel() -> None:
    x, w = torch.randn(20, 16), torch.randn(3, 16, 8)
    offs = torch.tensor([5, 5, 20], dtype=torch.int32)
    expected = torch.cat([x[:5] @ w[0], x[5:] @ w[2]])
    assert torch.allclose(grouped_mm(x, w, offs), expected, atol=1e-5)
    assert torch.allclose(grouped_mm(x.double(), w.double(), offs), expected.double(), atol=1e-5)
    odd = torch.randn(3, 16, 3)  # 12-byte rows: not 16-byte aligned, takes the loop
    assert torch.allclose(grouped_mm(x, odd, offs), torch.cat([x[:5] @ odd[0], x[5:] @ odd[2]]), atol=1e-5)
