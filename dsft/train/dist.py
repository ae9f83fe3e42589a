"""An adapter sharded by FSDP2: gathered for saving, loaded back into the shards on resume (which process
writes is dsft.outputs.is_main)."""

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

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not any(isinstance(p, DTensor) for _, p in params):
        return None
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu() for n, p in params}


def load_full_trainable_state(model: "nn.Module", adapter_file: "Path", adapter_name: str = "default") -> None:
    """Put an adapter file's weights (PEFT's saved names) into the model's FSDP2-sharded trainable
    parameters; each rank keeps its shard. A collective: every rank must call it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from dsft.errors import DsftError

    names = {n: n for n, p in model.named_parameters() if p.requires_grad and f".{adapter_name}" in n}
    saved_as = get_peft_model_state_dict(model, state_dict=names, adapter_name=adapter_name)  # saved key -> name
    saved = load_file(adapter_file)
    missing = sorted(k for k in saved_as if k not in saved)
    if missing:
        raise DsftError(f"{adapter_file}: has no {missing[0]} (and {len(missing) - 1} more); "
                        "the checkpoint does not belong to this run's adapter")
    state = {name: saved[key] for key, name in saved_as.items()}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
