"""One rank of tests/test_fsdp.py (run by torchrun over gloo): dsft's NF4 model with expert LoRA,
sharded with FSDP2 as accelerate's TRANSFORMER_BASED_WRAP does (each decoder layer, then the root)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from dsft.adapters.lora import attach_lora
from dsft.config.schema import AdapterSection, ModelSection
from dsft.models.load import load_model, resolve_model_path
from dsft.moe.experts import DsftExperts, expert_modules, layer_of
from dsft.train.dist import full_trainable_state


def build() -> nn.Module:
    section = ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32", quantization="nf4")
    base = load_model(section, resolve_model_path(section.path))
    every_expert = {layer_of(n): None for n in expert_modules(base)}
    model = attach_lora(base, AdapterSection(r=4, alpha=8, routed_experts="all"), every_expert)[0]
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    return model


def step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits = model(input_ids=ids).logits
    loss = logits.float().pow(2).mean()
    loss.backward()
    opt.step()
    return logits.detach(), float(loss)


def main(out: str) -> None:
    resolve_model_path("builtin:tiny-deepseek-v3")  # materialised before the process group: transformers saves on rank 0 only
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(0, 100, (2 * world, 16), generator=torch.Generator().manual_seed(1))
    reference = build()
    ref_logits, _ = step(reference, ids)
    expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}

    model = build()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    experts = [m for m in model.modules() if isinstance(m, DsftExperts)]
    packed = [m.gate_up_nf4.packed for m in experts] + [m.down_nf4.packed for m in experts]
    mine = slice(2 * rank, 2 * rank + 2)
    logits, _ = step(model, ids[mine])
    gathered = full_trainable_state(model)
    report = {
        "packed_sharded": all(isinstance(p, DTensor) for p in packed),
        "packed_local_fraction": sum(p.to_local().numel() for p in packed) / sum(p.numel() for p in packed),
        "logits_max_diff": float((logits - ref_logits[mine]).abs().max()),
        "missing": sorted(set(expected) - set(gathered)),
        "param_max_diff": max(float((gathered[n] - expected[n]).abs().max()) for n in expected),
        "expert_lora_params": sum("experts.lora_" in n for n in gathered),
    }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
