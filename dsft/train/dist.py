"""Which process writes: under `accelerate launch` every rank runs the same command, and only the main
one creates the run directory and writes files (the Trainer does the same for its checkpoints)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of `dsft --help`
    import torch
    from torch import nn


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
