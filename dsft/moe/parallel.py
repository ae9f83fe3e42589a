"""Expert parallelism and FSDP2 for dsft's experts, on transformers' engine (`transformers.distributed`).

`parallelize(model, fsdp=N, ep=M)` lays a loaded model (with or without its adapter) over the process group:
- expert parallelism over `ep` ranks: every per-expert tensor of each DsftExperts (the NF4 codes, block scales
  and scale state, or the plain weights) and of its expert LoRA is sharded on dim 0 (`ep_plan`), so each rank
  holds 1/M of the experts (LoRA on a subset of them in padded slots, dsft.moe.lora.expert_slots), and the experts module is reached through transformers' all-to-all token dispatch
  (`ep_dispatch_experts`, `AllToAllEP`), which hands it local expert ids;
- FSDP2 (`fully_shard`) over `fsdp` ranks for every decoder layer and the root, and over the expert FSDP axis
  for the experts modules, with their gradients divided by the number of distinct batches, as transformers
  does (`apply_fully_sharded_data_parallelism`).
The experts module reads every weight as the local tensor it holds (dsft.moe.nf4.local), in forward and in
backward; it holds no process group and gathers nothing itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from dsft.moe.experts import DsftExperts
from dsft.moe.lora import ExpertLoraLayer
from dsft.moe.nf4 import PackedNF4

ROWS = "dsft_expert_rows"  # dsft's EP style: a parameter's dim 0 (its experts) split over the EP ranks
HELD_ROWS = "dsft_held_expert_rows"  # the same, for a module loaded holding only its rank's rows already
_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+$")


def _register_styles() -> None:
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    if ROWS in ALL_PARALLEL_STYLES:
        return
    import torch
    from torch.distributed.tensor import DTensor, Shard
    from transformers.distributed.expert_parallel import ExpertParallelLayer, MoEParamShard

    class HeldRows(ExpertParallelLayer):
        """A parameter that already holds this rank's rows: made the rank's shard of the whole, no copy."""

        def shard_param(self, module: nn.Module, param: str, mesh: Any) -> None:
            local = module._parameters[param]
            module._parameters[param] = torch.nn.Parameter(
                DTensor.from_local(local.data, mesh, [Shard(0)], run_check=False), requires_grad=local.requires_grad)

    # shards_expert_dim=False: the experts module counts its experts from the local rows it holds
    ALL_PARALLEL_STYLES.register(ROWS, MoEParamShard(Shard(0)))
    ALL_PARALLEL_STYLES.register(HELD_ROWS, HeldRows())


def _expert_tensors(name: str, experts: DsftExperts) -> list[str]:
    if experts.quantized:
        return [f"{name}.{store}.{part}" for store in ("gate_up_nf4", "down_nf4") for part in PackedNF4.PARTS]
    return [f"{name}.gate_up_proj", f"{name}.down_proj"]


def ep_plan(model: nn.Module) -> dict[str, str]:
    """transformers' EP plan for `model`, names expanded: every per-expert parameter (the base's and its expert
    LoRA's, for every adapter) sharded on dim 0, then each experts module (the LoRA layer when there is one)
    dispatching its tokens. Parameters come first: the dispatch counts the experts they leave on this rank."""
    params: dict[str, str] = {}
    dispatch: dict[str, str] = {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not isinstance(module, DsftExperts):
            continue
        style = HELD_ROWS if module.global_experts else ROWS
        params.update(dict.fromkeys(_expert_tensors(name, module), style))
        outer = name.removesuffix(".base_layer")
        if isinstance(modules.get(outer), ExpertLoraLayer):
            lora = modules[outer]
            params.update(dict.fromkeys((f"{outer}.{n}" for n, _ in lora.named_parameters()
                                         if n.startswith("lora_")), style))
        dispatch[outer] = "ep_dispatch_experts"
    return {**params, **dispatch}


def _mesh(fsdp: int, ep: int) -> tuple[Any, Any]:
    """transformers' config and device mesh for FSDP2 over `fsdp` ranks and expert parallelism (all-to-all) over
    `ep` of them."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.utils import initialize_distributed_mesh

    config = DistributedConfig(fsdp_size=fsdp, ep_size=ep, ep_implementation="all_to_all")
    return config, initialize_distributed_mesh(config)[1]


@contextlib.contextmanager
def dispatched(model: nn.Module, ep: int) -> Iterator[None]:
    """A model loaded holding only this rank's experts (dsft.models.stream's expert_part) made runnable for a while
    without gradients (the routing profile, before the adapter is attached): each experts module reached through
    transformers' all-to-all token dispatch over `ep` ranks, which hands it local expert ids, then restored. Every
    rank must run the same number of forwards."""
    import torch.distributed as dist
    from transformers.distributed.expert_parallel import EPImplementationInterface

    config, mesh = _mesh(dist.get_world_size(), ep)
    held = [m for m in model.modules() if isinstance(m, DsftExperts) and m.global_experts]
    for module in held:
        module.forward = EPImplementationInterface()[config.ep_implementation](module, mesh.get_mesh("ep"),
                                                                              mesh.get_mesh("tp"))
    try:
        yield
    finally:
        for module in held:
            del module.forward


def shard_around_experts(model: nn.Module) -> nn.Module:
    """FSDP2 over every process for each decoder layer and the root, the routed experts left out as they are (held
    whole, or this rank's block under expert parallelism: `dispatched`): a model that only runs forwards, the routing
    profile's, holding 1/N of everything else."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    experts = {p for module in model.modules() if isinstance(module, DsftExperts) for p in module.parameters()}
    for name, module in model.named_modules():
        if _DECODER_LAYER.search(name):
            fully_shard(module, mesh=mesh, ignored_params=experts)
    return fully_shard(model, mesh=mesh, ignored_params=experts)


def fsdp_plan(model: nn.Module) -> dict[str, str]:
    """Every decoder layer sharded and freed after its forward (the root is sharded last, by `parallelize`)."""
    return {name: "free_full_weight" for name, _ in model.named_modules() if _DECODER_LAYER.search(name)}


def parallelize(model: nn.Module, fsdp: int, ep: int) -> nn.Module:
    """Shard `model` over the default process group (world size fsdp; ep divides it): see the module docstring.
    Call before building the optimizer; every rank calls it with the same model."""
    from transformers.distributed.expert_parallel import apply_expert_parallelism
    from transformers.distributed.fsdp import apply_fully_sharded_data_parallelism

    _register_styles()
    config, mesh = _mesh(fsdp, ep)
    experts = ep_plan(model) if ep > 1 else {}
    if experts:
        rank = mesh.get_mesh("ep").get_local_rank()
        for module in model.modules():
            if isinstance(module, ExpertLoraLayer) and not module.get_base_layer().global_experts:
                module.pad_for_expert_parallel(ep, rank)  # an expert subset's LoRA into padded slots
        apply_expert_parallelism(model, mesh.get_mesh("ep"), mesh.get_mesh("tp"), experts, config.ep_implementation)
        for module in model.modules():
            if isinstance(module, DsftExperts):
                module.ep_size = ep
    _model_config(model).distributed_config = config  # read by apply_fully_sharded_data_parallelism
    if fsdp > 1:
        apply_fully_sharded_data_parallelism(model, mesh, fsdp_plan(model), experts)
    return model


def _model_config(model: nn.Module) -> Any:
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def local_fraction(model: nn.Module) -> float:
    """The share of the experts' stored elements (codes, scales, weights, expert LoRA) this rank holds."""
    from torch.distributed.tensor import DTensor

    params = {id(p): p for module in model.modules() if isinstance(module, (DsftExperts, ExpertLoraLayer))
              for p in module.parameters()}  # a LoRA layer's parameters include its experts': each counted once
    total = sum(p.numel() for p in params.values())
    mine = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params.values())
    return mine / total if total else 1.0


def unsharded_trainable(model: nn.Module) -> list[str]:
    """Trainable parameters of expert-parallel experts modules that are not sharded tensors (a guard: a plain
    tensor there would be broadcast from rank 0 and averaged like a replicated weight)."""
    from torch.distributed.tensor import DTensor

    return [f"{name}.{n}" for name, module in model.named_modules() if isinstance(module, ExpertLoraLayer)
            for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]

