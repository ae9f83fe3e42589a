"""Expert LoRA as a PEFT LoRA layer around DsftExperts.

Registered with PEFT as a custom LoRA module, so the rest of the stack treats it like any LoRA layer:
`disable_adapter()` switches it off, named adapters (TRL's frozen "ref" copy) are added with
`add_adapter`/`set_adapter`, and PEFT saves and restores its weights with trainer checkpoints.

Per adapter and per selected expert e of the layer: gate_up A_e [r, H], B_e [2I, r]; down A_e [r, I],
B_e [H, r]. Which experts of a layer carry LoRA is read from the base module's `dsft_lora_experts`
(all experts when unset); tokens routed to other experts see the base expert only, and gradients flow
to the selected experts' A/B only. W + BA is never formed.

Under expert parallelism the selected experts sit unevenly across the ranks, so their LoRA is stored in padded
slots (`expert_slots`): each rank's selected experts, in order, then zero rows up to the largest rank's count,
so every rank holds an equal block of one tensor that the engine shards on dim 0. A padding slot is never read
(no gradient, zero forever); the adapter is saved and loaded without them (`padded_rows`), in the one-process
layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from dsft.moe.delta import expert_factors, lora_delta
from dsft.moe.experts import DsftExperts, ExpertDelta, ExpertReplacement
from dsft.moe.nf4 import local

SELECTION_ATTR = "dsft_lora_experts"
MODE_ATTR = "dsft_expert_mode"  # "lora" (default) or "full"


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """LoRA's scale s in W + s B A: alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's rule, for training
    and merge alike)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def _device_of(module: nn.Module) -> torch.device:
    if isinstance(module, DsftExperts):
        return module.weight.device
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


class Weight(nn.Module):
    """One adapter tensor as `.weight` of a module, as PEFT stores LoRA: parameter names then read
    `...lora_gate_up_A.<adapter>.weight`, which PEFT's save/load and TRL's "ref" copy expect."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(tensor)


def _expand(t: torch.Tensor, index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[n, a, b] for the selected experts -> [E, a, b] with zeros elsewhere (differentiable)."""
    if t.shape[0] == num_experts:
        return t
    full = t.new_zeros(num_experts, *t.shape[1:])
    return full.index_copy(0, index, t)


def expert_slots(experts: list[int], total: int, ep: int) -> list[int]:
    """The padded slot layout of a layer's selected `experts` (of `total`) over `ep` ranks: for each rank, its
    selected experts in order, then -1 (padding) up to the largest rank's count."""
    per = total // ep
    groups = [[e for e in experts if e // per == rank] for rank in range(ep)]
    width = max(len(g) for g in groups)
    return [e for g in groups for e in g + [-1] * (width - len(g))]


def _slotted(whole: torch.Tensor, experts: list[int], block: list[int]) -> torch.Tensor:
    """The rows of `whole` ([len(experts), ...], one per selected expert) for the slots `block`, zeros in padding."""
    out = whole.new_zeros(len(block), *whole.shape[1:])
    for slot, expert in enumerate(block):
        if expert >= 0:
            out[slot] = whole[experts.index(expert)]
    return out


class ExpertLoraLayer(nn.Module, LoraLayer):
    adapter_layer_names = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B",
                           "lora_full_gate_up", "lora_full_down")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_experts")

    def __init__(self, base_layer: DsftExperts, adapter_name: str, config: Any, r: int, lora_alpha: float,
                 **kwargs: Any) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self.lora_gate_up_A = nn.ModuleDict()
        self.lora_gate_up_B = nn.ModuleDict()
        self.lora_down_A = nn.ModuleDict()
        self.lora_down_B = nn.ModuleDict()
        self.lora_full_gate_up = nn.ModuleDict()
        self.lora_full_down = nn.ModuleDict()
        self.lora_experts: dict[str, list[int]] = {}
        self.slots: dict[str, list[int]] = {}  # padded slots, every rank's, when expert parallelism splits a subset
        self._index: dict[str, torch.Tensor] = {}
        self._take: dict[str, torch.Tensor] = {}  # the slots of this rank's block that hold an expert
        self._held: dict[str, list[int]] = {}  # and those experts
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    @property
    def num_experts(self) -> int:
        """The base's (this rank's experts under expert parallelism, which dispatches tokens by it)."""
        return self.get_base_layer().num_experts

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.hidden_dim, module.hidden_dim

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs: Any) -> None:
        base: DsftExperts = self.get_base_layer()
        experts = sorted(getattr(base, SELECTION_ATTR, None) or range(base.all_experts))
        n, hidden, inter = len(experts), base.hidden_dim, base.intermediate_dim
        device = _device_of(base)
        index = torch.tensor(experts, dtype=torch.long, device=device)
        if getattr(base, MODE_ATTR, "lora") == "full":  # fp32 masters of the selected experts' whole weights
            self.lora_full_gate_up[adapter_name] = Weight(base.gate_up_weight().detach()[index].float())
            self.lora_full_down[adapter_name] = Weight(base.down_weight().detach()[index].float())
            self._register(adapter_name, r, lora_alpha, config, experts, index)
            return
        shapes = {"lora_gate_up_A": (n, r, hidden), "lora_gate_up_B": (n, 2 * inter, r),
                  "lora_down_A": (n, r, inter), "lora_down_B": (n, hidden, r)}
        whole = {}
        for name, shape in shapes.items():
            weight = torch.zeros(shape, dtype=torch.float32, device=device)
            if name.endswith("_A"):  # PEFT's default LoRA init: A kaiming-uniform per expert, B zero
                nn.init.kaiming_uniform_(weight.view(-1, shape[-1]), a=math.sqrt(5))
            whole[name] = weight  # initialised whole, as one process would (same seed, same values)
        if base.global_experts:  # only this rank's experts are held: keep its block of the padded slots
            ep, rank = base.all_experts // base.num_experts, base.first_expert // base.num_experts
            slots = expert_slots(experts, base.all_experts, ep)
            width = len(slots) // ep
            for name, weight in whole.items():
                getattr(self, name)[adapter_name] = Weight(_slotted(weight, experts, slots[rank * width:(rank + 1) * width]))
            self._register(adapter_name, r, lora_alpha, config, experts, index)
            self._use_slots(adapter_name, slots, rank, ep)
            return
        for name, weight in whole.items():
            getattr(self, name)[adapter_name] = Weight(weight)
        self._register(adapter_name, r, lora_alpha, config, experts, index)

    def _register(self, adapter_name: str, r: int, lora_alpha: float, config: Any, experts: list[int],
                  index: torch.Tensor) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_scale(r, lora_alpha, config.use_rslora)
        self.lora_experts[adapter_name] = experts
        self._index[adapter_name] = index
        self.set_adapter(self.active_adapters)

    def _block(self, adapter_name: str, rank: int, ep: int) -> list[int]:
        width = len(self.slots[adapter_name]) // ep
        return self.slots[adapter_name][rank * width:(rank + 1) * width]

    def _use_slots(self, adapter_name: str, slots: list[int], rank: int, ep: int) -> None:
        """Read the adapter's LoRA from padded `slots` (rank `rank` of `ep` holding its block): which slots hold an
        expert, and that expert's id among the rank's own."""
        self.slots[adapter_name] = slots
        block = self._block(adapter_name, rank, ep)
        self._held[adapter_name] = [e for e in block if e >= 0]
        first = rank * (self.get_base_layer().all_experts // ep)
        device = self._index[adapter_name].device
        self._take.pop(adapter_name, None)
        if -1 in block:  # else every slot is read, in order: no gather
            self._take[adapter_name] = torch.tensor([i for i, e in enumerate(block) if e >= 0], dtype=torch.long,
                                                    device=device)
        self._index[adapter_name] = torch.tensor([e - first for e in block if e >= 0], dtype=torch.long, device=device)

    def pad_for_expert_parallel(self, ep: int, rank: int) -> None:
        """Before expert parallelism splits this whole layer over `ep` ranks (this one `rank`): each adapter on a
        subset of the experts is moved into padded slots, so every rank's block holds its own experts' LoRA."""
        for adapter_name, experts in self.lora_experts.items():
            if adapter_name in self.slots or adapter_name not in self.lora_gate_up_A:
                continue
            if len(experts) == self.get_base_layer().all_experts:  # all of them: the plain split is the slots
                continue
            self._use_slots(adapter_name, expert_slots(experts, self.get_base_layer().all_experts, ep), rank, ep)
            for name in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"):
                old = getattr(self, name)[adapter_name].weight
                padded = _slotted(old.detach(), experts, self.slots[adapter_name])
                getattr(self, name)[adapter_name] = Weight(padded)
                getattr(self, name)[adapter_name].weight.requires_grad_(old.requires_grad)

    def saved_rows(self, adapter_name: str) -> slice:
        """The rows of the adapter's saved tensors (one per selected expert, in order) that this rank's block holds:
        its own experts', contiguous."""
        held = self._held[adapter_name]
        first = self.lora_experts[adapter_name].index(held[0]) if held else 0
        return slice(first, first + len(held))

    def into_block(self, adapter_name: str, rows: torch.Tensor) -> torch.Tensor:
        """`saved_rows` of a saved tensor in this rank's block of slots (zeros in padding)."""
        if adapter_name not in self._take:
            return rows
        width = len(self.slots[adapter_name]) // (self.get_base_layer().all_experts // self.num_experts)
        out = rows.new_zeros(width, *rows.shape[1:])
        out[self._take[adapter_name].cpu()] = rows
        return out

    def _index_on(self, adapter_name: str, like: torch.Tensor) -> torch.Tensor:
        if self._index[adapter_name].device != like.device:
            self._index[adapter_name] = self._index[adapter_name].to(like.device)
            if adapter_name in self._take:
                self._take[adapter_name] = self._take[adapter_name].to(like.device)
        return self._index[adapter_name]

    def _rows(self, name: str, adapter_name: str) -> torch.Tensor:
        """The adapter tensor's rows for the experts this rank runs (padding slots left out)."""
        rows = local(getattr(self, name)[adapter_name].weight)
        return rows[self._take[adapter_name]] if adapter_name in self._take else rows

    def delta(self, adapter_name: str) -> ExpertDelta:
        num = self.get_base_layer().num_experts
        index = self._index_on(adapter_name, self.lora_gate_up_A[adapter_name].weight)
        get = lambda name: _expand(self._rows(name, adapter_name), index, num)  # noqa: E731
        return ExpertDelta(get("lora_gate_up_A"), get("lora_gate_up_B"), get("lora_down_A"), get("lora_down_B"),
                           self.scaling[adapter_name])

    def get_delta_weight(self, adapter_name: str, expert: int, proj: str) -> torch.Tensor:
        """Expert `expert`'s weight change on `proj` (gate_proj, up_proj, down_proj): what a merge adds to it."""
        if adapter_name in self.slots:
            raise ValueError("the adapter is split over expert-parallel ranks: read its weight changes once saved")
        tensors = {name: getattr(self, name)[adapter_name].weight.detach() for name in
                   ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")}
        a, b = expert_factors(tensors, self.lora_experts[adapter_name].index(expert), proj)
        return lora_delta(a, b, self.scaling[adapter_name])

    def replacement(self, adapter_name: str) -> ExpertReplacement:
        gate_up = self.lora_full_gate_up[adapter_name].weight
        return ExpertReplacement(self._index_on(adapter_name, gate_up), local(gate_up),
                                 local(self.lora_full_down[adapter_name].weight))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters:
            return base(hidden_states, top_k_index, top_k_weights)
        deltas = tuple(self.delta(a) for a in self.active_adapters if a in self.lora_gate_up_A)
        replacements = tuple(self.replacement(a) for a in self.active_adapters if a in self.lora_full_gate_up)
        return base(hidden_states, top_k_index, top_k_weights, deltas=deltas, replacements=replacements)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("expert LoRA is merged from the original checkpoint by `dsft merge`")

    def unmerge(self) -> None:
        return None

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def padded_rows(model: nn.Module) -> dict[str, tuple[list[int], int]]:
    """Every adapter tensor held in padded slots (by parameter name in `model`): (the slots that hold an expert,
    in order; the slot count). Those rows of the gathered tensor are the one-process (saved) layout."""
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertLoraLayer):
            for adapter_name, slots in module.slots.items():
                real = [i for i, e in enumerate(slots) if e >= 0]
                for tensor in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"):
                    rows[f"{name}.{tensor}.{adapter_name}.weight"] = (real, len(slots))
    return rows


def unpad(tensor: torch.Tensor, rows: tuple[list[int], int]) -> torch.Tensor:
    """A gathered padded tensor in the saved layout (one row per selected expert)."""
    return tensor[rows[0]]


def pad(tensor: torch.Tensor, rows: tuple[list[int], int]) -> torch.Tensor:
    """A saved-layout tensor in padded slots (zeros in padding)."""
    out = tensor.new_zeros(rows[1], *tensor.shape[1:])
    out[rows[0]] = tensor
    return out


def register(config: Any) -> Any:
    """Let PEFT put ExpertLoraLayer on DsftExperts modules named in `config.target_modules`."""
    config._register_custom_module({DsftExperts: ExpertLoraLayer})
    return config
