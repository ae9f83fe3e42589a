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
    assert nf4.gate_up_nf4.codes.dtype == torch.uint8
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

    assert torch.autograd.gradcheck(f, (x, *lora), fast_mode=True)  # checks random projections of the Jacobian (half the time)


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


def test_nf4_rows_of_the_experts_are_the_experts_quantized_alone() -> None:
    """Every NF4 tensor is per expert on dim 0 (codes, 8-bit block scales, scale state): any slice of the experts,
    as expert parallelism keeps it on a rank, holds the bytes of quantizing those experts alone and dequantizes to
    their weights; the scale state is int32 bit patterns, so casting the model to bf16 leaves it exact."""
    from dsft.moe.nf4 import PackedNF4, dequantize_experts

    weight = torch.randn(8, 64, 32, generator=torch.Generator().manual_seed(3))
    whole, half = PackedNF4(weight, torch.float32), PackedNF4(weight[4:], torch.float32)
    for name in PackedNF4.PARTS:
        assert getattr(whole, name).shape[0] == 8 and torch.equal(getattr(whole, name)[4:], getattr(half, name))
    rows = [getattr(whole, name)[4:] for name in PackedNF4.PARTS]
    assert torch.equal(dequantize_experts(*rows, whole.shape, torch.float32), whole.dequantize()[4:])
    state = whole.scale_state.clone()
    whole.to(torch.bfloat16)
    assert whole.scale_state.dtype == torch.int32 and torch.equal(whole.scale_state, state)


def test_the_expert_parallel_plan_names_every_expert_tensor_and_the_guard_finds_a_plain_one() -> None:
    """dsft.moe.parallel's plan for a model with expert LoRA: each DsftExperts' NF4 parts and its LoRA tensors split
    on dim 0, the LoRA layer dispatching tokens, parameters first; before sharding, the guard names the LoRA
    tensors as not sharded (the state it exists to catch)."""
    from dsft.adapters.lora import attach_lora
    from dsft.config.schema import AdapterSection, ModelSection
    from dsft.models.load import load_model
    from dsft.moe.experts import expert_modules, layer_of
    from dsft.moe.parallel import ROWS, ep_plan, unsharded_trainable

    section = ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32", quantization="nf4")
    base = load_model(section, resolve_model_path(section.path))
    model = attach_lora(base, AdapterSection(r=4, alpha=8, routed_experts="all"),
                        {layer_of(n): None for n in expert_modules(base)})[0]
    plan = ep_plan(model)
    dispatch = [n for n, style in plan.items() if style == "ep_dispatch_experts"]
    assert dispatch == ["base_model.model.model.layers.1.mlp.experts", "base_model.model.model.layers.2.mlp.experts"]
    assert list(plan.values()) == [ROWS] * (len(plan) - 2) + ["ep_dispatch_experts"] * 2
    layer = "base_model.model.model.layers.1.mlp.experts"
    expected = {f"{layer}.base_layer.{store}.{part}" for store in ("gate_up_nf4", "down_nf4")
                for part in ("codes", "scales", "scale_state")}
    expected |= {f"{layer}.lora_{p}_{ab}.default.weight" for p in ("gate_up", "down") for ab in "AB"}
    assert {n for n in plan if n.startswith(layer + ".")} == expected
    assert {n for n in unsharded_trainable(model) if n.startswith(layer + ".")} == {
        f"{layer}.lora_{p}_{ab}.default.weight" for p in ("gate_up", "down") for ab in "AB"}
