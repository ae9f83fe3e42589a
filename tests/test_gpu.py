"""CUDA checks of the 4-bit expert kernels and a bf16 QLoRA step (marked gpu; skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsft.models.load import resolve_model_path

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0) if torch.cuda.is_available() else None


def test_nf4_experts_bf16_on_cuda_match_eager_and_reuse_one_buffer() -> None:
    from dsft.moe.experts import DsftExperts

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-deepseek-v3"), dtype=torch.bfloat16,
                                                 experts_implementation="eager").to(CUDA)
    eager = model.model.layers[1].mlp.experts
    nf4 = DsftExperts.from_module(eager, quantized=True)
    other = DsftExperts.from_module(model.model.layers[2].mlp.experts, quantized=True)
    assert nf4.gate_up_nf4.dequantize().data_ptr() == other.gate_up_nf4.dequantize().data_ptr()
    dequant = copy.deepcopy(eager)
    dequant.gate_up_proj.data = nf4.gate_up_nf4.dequantize().clone()
    dequant.down_proj.data = nf4.down_nf4.dequantize().clone()
    x = torch.randn(64, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.stack([torch.randperm(8, device=CUDA)[:2] for _ in range(64)])
    w = torch.rand(64, 2, device=CUDA, dtype=torch.bfloat16)
    ours, ref = nf4(x, idx, w), dequant(x, idx, w)
    assert ((ours - ref).float().norm() / ref.float().norm()) < 2e-2
    grad = torch.autograd.grad(ours.sum(), x)[0]
    ref_grad = torch.autograd.grad(ref.sum(), x)[0]
    assert ((grad - ref_grad).float().norm() / ref_grad.float().norm()) < 2e-2


def test_qlora_steps_on_cuda(make_recipe, cli, tmp_path) -> None:
    recipe = make_recipe(model={"quantization": "nf4", "dtype": "bfloat16"}, adapter={"routed_experts": "all"},
                         training={"max_steps": 20})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    import json

    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]


def test_compiled_kernels_match_eager_on_cuda() -> None:
    from dsft.moe import fused

    assert fused._compile_enabled(), "torch.compile (triton) should be available on a CUDA machine"
    torch.manual_seed(0)
    gate = torch.randn(300, 96, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(300, 96, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    scale = torch.rand(300, 1, device=CUDA, dtype=torch.bfloat16)
    weight = torch.rand(96, device=CUDA, dtype=torch.bfloat16)
    results = []
    for silu_mul, rms_norm in ((fused.silu_mul, fused.rms_norm), (fused._silu_mul, fused._rms_norm)):
        outs = (silu_mul(gate, up, scale), rms_norm(gate, weight, 1e-6))
        results.append((*outs, *torch.autograd.grad(sum(t.float().sum() for t in outs), (gate, up))))
    assert not fused._broken, "torch.compile fell back to eager"
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)
