"""An adapter sharded by FSDP2 (or split by expert parallelism): gathered for saving, loaded back into the shards
on resume, and its sharded optimizer state saved and loaded through torch.distributed.checkpoint (which process
writes the whole files is dsft.outputs.is_main)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of `dsft --help`
    from pathlib import Path

    import torch
    from torch import nn


def full_trainable_state(model: "nn.Module") -> "dict[str, torch.Tensor] | None":
    """The adapter's full weights when FSDP2 has sharded them (DTensors), gathered on every rank, so
    the main rank can pass them to `save_pretrained(state_dict=...)`; None when nothing is sharded.

    A collective: every rank must call it. Only trainable tensors are gathered, never the frozen base
    (whose NF4 expert codes are most of the model)."""
    from torch.distributed.tensor import DTensor

    from dsft.moe.lora import padded_rows, unpad

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not any(isinstance(p, DTensor) for _, p in params):
        return None
    padded = padded_rows(model)  # an expert subset's LoRA, split over expert-parallel ranks: padding left out
    state = {}
    for n, p in params:
        full = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
        state[n] = unpad(full, padded[n]) if n in padded else full
    return state


def load_full_trainable_state(model: "nn.Module", adapter_file: "Path", adapter_name: str = "default") -> None:
    """Put an adapter file's weights (PEFT's saved names) into the model's FSDP2-sharded trainable
    parameters; each rank keeps its shard. A collective: every rank must call it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from dsft.errors import DsftError
    from dsft.moe.lora import pad, padded_rows

    names = {n: n for n, p in model.named_parameters() if p.requires_grad and f".{adapter_name}" in n}
    saved_as = get_peft_model_state_dict(model, state_dict=names, adapter_name=adapter_name)  # saved key -> name
    saved = load_file(adapter_file)
    missing = sorted(k for k in saved_as if k not in saved)
    if missing:
        raise DsftError(f"{adapter_file}: has no {missing[0]} (and {len(missing) - 1} more); "
                        "the checkpoint does not belong to this run's adapter")
    padded = padded_rows(model)  # an expert subset's LoRA split over expert-parallel ranks: into its slots
    state = {name: pad(saved[key], padded[name]) if name in padded else saved[key] for key, name in saved_as.items()}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


OPTIMIZER_DIR = "optimizer_dcp"  # a checkpoint's sharded optimizer state: one file per rank, torch.distributed.checkpoint


def _optimizer_of(optimizer: "torch.optim.Optimizer") -> "torch.optim.Optimizer":
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def save_sharded_optimizer(model: "nn.Module", optimizer: "torch.optim.Optimizer", checkpoint: "Path") -> None:
    """Each rank writes its shards of the optimizer state under checkpoint/optimizer_dcp. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, _optimizer_of(optimizer))
    dcp.save({"optimizer": state}, checkpoint_id=str(checkpoint / OPTIMIZER_DIR))


def load_sharded_optimizer(model: "nn.Module", optimizer: "torch.optim.Optimizer", checkpoint: "Path") -> None:
    """The optimizer state `save_sharded_optimizer` wrote, each rank reading its own shards. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    inner = _optimizer_of(optimizer)
    state = {"optimizer": get_optimizer_state_dict(model, inner)}  # the layout to read into
    dcp.load(state, checkpoint_id=str(checkpoint / OPTIMIZER_DIR))
    set_optimizer_state_dict(model, inner, state["optimizer"])
