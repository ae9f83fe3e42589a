"""What run.json's summary holds for every run, whatever its objective: trainable parameters by group, the
rows' tokens, peak memory, processes, how the NF4 expert codes were held."""

from __future__ import annotations

from typing import Any

import torch

from dsft.train.objective import Prepared

def group_params(model: torch.nn.Module, targets: dict[str, list[str]]) -> dict[str, int]:
    """Trainable parameters per module group (routers trained whole count as `router`), whole: expert LoRA held
    in expert-parallel slots counts its experts' rows on every rank, never the padding."""
    from dsft.moe.lora import padded_rows

    owner = {name: group for group, names in targets.items() for name in names}
    counts = dict.fromkeys(targets, 0)
    slotted = padded_rows(model)  # expert LoRA held in slots (expert parallelism): its experts' rows, no padding
    for name, param in model.named_parameters():
        if param.requires_grad:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            group = "router" if ".modules_to_save." in name else owner.get(module, "other")
            whole = param.shape[1:].numel() * len(slotted[name][0]) if name in slotted else param.numel()
            counts[group] = counts.get(group, 0) + whole
    return counts


def spine_summary(trainer: Any, prepared: Prepared, groups: dict[str, int], targets: dict[str, list[str]]) -> dict[str, Any]:
    """What run.json's summary holds for every run, whatever its objective: trainable parameters by group,
    the tokens of its rows, peak memory, processes, how the NF4 expert codes were held, the adapted modules."""
    import numpy as np

    from dsft.models.load import world_size

    max_length = prepared.recipe.data.max_length
    return {"trainable_params": {g: n for g, n in groups.items() if n},
            "train_rows": len(prepared.train),
            "train_tokens": int(np.minimum(prepared.train.column("length"), max_length).sum()),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "peak_host_gib": peak_host_gib(), "processes": world_size(),
            "expert_codes": expert_codes_layout(trainer.model), "targets": targets,
            **({"data_mix": prepared.train.meta["mix"]} if prepared.train.meta.get("mix") else {})}


def peak_host_gib() -> float | None:
    """This process's peak resident memory so far (Linux and macOS), in GiB."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def model_params(model: torch.nn.Module) -> int:
    """Parameters of the model as trained, counting 4-bit weights by their shape (bitsandbytes packs
    two per byte; dsft's expert codes are not parameters when sharded)."""
    from dsft.moe.nf4 import PackedNF4

    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, PackedNF4):
            total += module.shape.numel()
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            state = getattr(p, "quant_state", None)
            total += state.shape.numel() if state is not None else p.numel()
    return total


def expert_codes_layout(model: torch.nn.Module) -> str | None:
    """How the routed experts' weights are held: `expert-parallel over N` ranks (training.parallel, NF4 or not);
    else the NF4 codes `whole` on every rank or `fsdp2` (training.parallel.ep 1); None without NF4 experts."""
    from torch.distributed.tensor import DTensor

    from dsft.moe.experts import DsftExperts

    split = [m.ep_size for m in model.modules() if isinstance(m, DsftExperts) and m.ep_size > 1]
    if split:
        return f"expert-parallel over {split[0]}"
    experts = [m for m in model.modules() if isinstance(m, DsftExperts) and m.quantized]
    if not experts:
        return None
    if isinstance(experts[0].gate_up_nf4.codes, DTensor):
        return "fsdp2"
    return "whole"
