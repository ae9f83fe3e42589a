"""The run's distributed layout (`training.parallel`): checked before any weight is read, applied to the trainer's
model before it trains (dsft.moe.parallel on transformers' engine)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from dsft.errors import DsftError

if TYPE_CHECKING:
    from pathlib import Path

    from dsft.config.schema import Recipe
    from dsft.train.objective import Objective


def processes() -> int:
    """The processes this command runs on: accelerate launch / torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(recipe: "Recipe", goal: "Objective", config: dict[str, Any], world: int | None,
                 init: "Path | None" = None) -> None:
    """training.parallel against the model's routed experts, the adapter a run continues (`init`)
    and (`world`, None in `dsft validate`) the number of processes; each failure one line naming the key and the
    fix. accelerate's own FSDP plugin (an `accelerate launch --config_file` with FSDP) is refused: FSDP2 is
    training.parallel's."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise DsftError("accelerate launch: this accelerate config turns on accelerate's FSDP plugin; dsft runs FSDP2 "
                        "itself: launch with --num-processes N (or an accelerate config without FSDP) and set "
                        "training.parallel: {ep: 1} (FSDP2 alone) or {ep: M} (with expert parallelism)")
    parallel = recipe.training.parallel
    if parallel is None:
        return
    from dsft import arch

    experts = arch.num_experts(config)
    if parallel.ep > 1 and not experts:
        raise DsftError(f"training.parallel.ep: {recipe.model.path} has no routed experts to split; set ep: 1 "
                        "(FSDP2 alone) or remove training.parallel")
    if experts % parallel.ep:
        raise DsftError(f"training.parallel.ep: {parallel.ep} does not divide the model's {experts} routed experts "
                        "per layer; use a divisor of it")
    if init is not None and parallel.ep > 1:
        _check_init_experts(goal, init)
    if world is not None and (world < 2 or world % parallel.ep):
        raise DsftError(f"training.parallel: runs on several processes, a multiple of ep ({parallel.ep}), this command "
                        f"has {world}; launch it with --num-processes N (or accelerate launch), or remove "
                        "training.parallel")


def apply_layout(trainer: Any, recipe: "Recipe") -> None:
    """FSDP2 over every process and expert parallelism over training.parallel.ep of them, applied to the trainer's
    model once TRL has built it (DPO's frozen "ref" copy of the adapter included) and before it trains; the model
    is then the Trainer's "sharded at load time" kind, which it neither wraps in DDP nor moves, and whose gradients
    are reduced as FSDP2 set up (transformers' path for `from_pretrained(distributed_config=...)`). The weights outside
    the routed experts, placeholders since loading, are then read: each rank only its FSDP2 shards' rows
    (dsft.models.shards)."""
    parallel = recipe.training.parallel
    if parallel is None:
        return
    from dsft.models.load import world_size
    from dsft.models.shards import read_rest, to_meta
    from dsft.moe.parallel import parallelize

    model = trainer.model
    to_meta(model)  # the weights outside the experts, placeholders since loading: FSDP2 shards them without memory
    parallelize(model, fsdp=world_size(), ep=parallel.ep)
    read_rest(model)  # each rank reads only its shards' rows of them
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base._is_distributed_loading_by_transformers = True
    base._is_fsdp_managed_module = True  # so generate() keeps every rank stepping until all are done (synced_gpus)
    trainer.is_distributed_loading_by_transformers = True


def _check_init_experts(goal: "Objective", init: "Path") -> None:
    """A continued adapter's routed experts must be LoRA (experts trained whole are not split yet)."""
    from dsft.adapters.metadata import read_metadata

    routed = read_metadata(init).get("routed_experts")
    if routed and routed.get("mode") == "full":
        raise DsftError(f"{goal.name}.init_adapter: {init} trains routed experts whole (mode: full), which expert "
                        "parallelism cannot split yet; continue it without training.parallel (DDP: --num-processes)")
