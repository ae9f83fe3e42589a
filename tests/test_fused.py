"""The fused paths (dsft.moe.fused, GatherRows) compute what transformers and PEFT compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsft.adapters.lora import attach_lora
from dsft.config.schema import AdapterSection, ModelSection
from dsft.moe.fused import fuse
from dsft.models.load import load_model, resolve_model_path
from dsft.moe.experts import GatherRows, expert_modules, layer_of


def _unfuse(model: nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop("forward", None)


def _lora_model(name: str, dropout: float = 0.0, quantization: str = "none"):
    section = ModelSection(path=f"builtin:{name}", dtype="float32", quantization=quantization)
    model = load_model(section, resolve_model_path(section.path))
    adapter = AdapterSection(r=4, alpha=8, dropout=dropout, routed_experts="all")
    model = attach_lora(model, adapter, {layer_of(n): None for n in expert_modules(model)})[0]
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    return model


def _logits_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name,quantization", [("tiny-deepseek-v3", "none"), ("tiny-deepseek-v2", "none"),
                                               ("tiny-deepseek-v3", "nf4")])
def test_fused_model_matches_transformers_and_peft(name: str, quantization: str) -> None:
    model = _lora_model(name, quantization=quantization)
    counts = fuse(model)
    assert counts["lora_linear"] > 0 and counts["rms_norm"] > 0 and counts["swiglu_mlp"] > 0
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    fused_logits, fused_grads = _logits_and_grads(model, ids)
    _unfuse(model)
    logits, grads = _logits_and_grads(model, ids)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(fused_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_lora_follows_peft_switches() -> None:
    model = _lora_model("tiny-deepseek-v3")
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        _unfuse(model)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, base)


def test_lora_dropout_takes_peft_forward() -> None:
    model = _lora_model("tiny-deepseek-v3", dropout=0.5)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    fused = model(input_ids=ids).logits
    _unfuse(model)
    torch.manual_seed(4)
    torch.testing.assert_close(model(input_ids=ids).logits, fused)


def test_gather_rows_backward_equals_indexing() -> None:
    gen = torch.Generator().manual_seed(5)
    tokens, k, hidden = 7, 3, 8
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    order = torch.argsort(torch.randint(0, 4, (tokens * k,), generator=gen), stable=True)
    grad = torch.randn(tokens * k, hidden, generator=gen)
    (ours,) = torch.autograd.grad(GatherRows.apply(x, order, k), x, grad)
    (ref,) = torch.autograd.grad(x[order // k], x, grad)
    torch.testing.assert_close(GatherRows.apply(x, order, k), x[order // k])
    torch.testing.assert_close(ours, ref)


@pytest.fixture
def compile_on_cpu(monkeypatch):
    """The CUDA compile path, run through dynamo on CPU tensors (eager backend: guards and recompiles
    behave as on a GPU, without inductor's compile time)."""
    from dsft.moe import fused

    monkeypatch.setattr(fused, "_wants_compile", lambda t: True)
    monkeypatch.setattr(fused, "_BACKEND", "eager")
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_broken", set())
    torch._dynamo.reset()
    yield fused
    torch._dynamo.reset()


def test_compiled_kernels_survive_many_shapes_dtypes_and_grad_modes(compile_on_cpu) -> None:
    """One run calls these with many token counts, dtypes and grad modes; with `fullgraph=True` the
    ninth variant hit dynamo's recompile limit as a hard error (seen on an H100)."""
    fused = compile_on_cpu
    for dtype in (torch.float32, torch.bfloat16):
        for grad in (True, False):
            for scaled in (True, False):
                for n in (3, 17, 40, 41):
                    gate = torch.randn(n, 8, dtype=dtype, requires_grad=grad)
                    up, scale = torch.randn(n, 8, dtype=dtype), torch.rand(n, 1, dtype=dtype)
                    with torch.set_grad_enabled(grad):
                        out = fused.silu_mul(gate, up, scale if scaled else None)
                        norm = fused.rms_norm(gate, torch.rand(8, dtype=dtype), 1e-6)
                    ref = torch.nn.functional.silu(gate) * up * (scale if scaled else 1)
                    torch.testing.assert_close(out, ref.to(dtype))
                    assert norm.shape == gate.shape and norm.requires_grad == grad
    assert set(fused._compiled) == {fused._silu_mul, fused._rms_norm} and not fused._broken


def test_compile_failure_falls_back_to_eager(compile_on_cpu, monkeypatch, caplog) -> None:
    fused = compile_on_cpu

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(fused, "_BACKEND", failing_backend)
    gate, up = torch.randn(5, 8), torch.randn(5, 8)
    with caplog.at_level("WARNING", logger="dsft.moe.fused"):
        out = fused.silu_mul(gate, up)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up)
    assert fused._silu_mul in fused._broken and "running it eagerly" in caplog.text
    torch.testing.assert_close(fused.silu_mul(gate, up), out)
