"""What a LoRA adapter changes in a weight, defined once (PEFT's `get_delta_weight`): training's expert layer
(dsft.moe.lora.ExpertLoraLayer.get_delta_weight), merge and verify (dsft.export.adapter) and the vLLM export's
per-expert factors and check (dsft.export.vllm) read it from here; the PEFT export writes the same factors in
PEFT's fused layout. Torch only: merge does not import PEFT."""

from __future__ import annotations

from typing import Any

import torch


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The one definition of a LoRA weight change (PEFT's get_delta_weight), [out, in] in fp32: scale * B @ A.
    Training (ExpertLoraLayer.get_delta_weight), merge, verify and both exports compute it here."""
    return (b.float() @ a.float()).mul_(scale)


def expert_factors(tensors: Any, i: int, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The i-th stored expert's LoRA factors (A [r, in], B [out, r]) for `proj`: gate_proj and up_proj share the
    fused A and take the first / second half of the fused B's rows; down_proj has its own."""
    if proj == "down_proj":
        return tensors["lora_down_A"][i], tensors["lora_down_B"][i]
    b = tensors["lora_gate_up_B"][i]
    inter = b.shape[0] // 2
    return tensors["lora_gate_up_A"][i], (b[:inter] if proj == "gate_proj" else b[inter:])
