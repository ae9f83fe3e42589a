"""Expert LoRA as a PEFT LoRA layer around DsftExperts.

Registered with PEFT as a custom LoRA module, so the rest of the stack treats it like any LoRA layer:
`disable_adapter()` switches it off, named adapters (TRL's frozen "ref" copy) are added with
`add_adapter`/`set_adapter`, and PEFT saves and restores its weights with trainer checkpoints.

Per adapter and per selected expert e of the layer: gate_up A_e [r, H], B_e [2I, r]; down A_e [r, I],
B_e [H, r]. Which experts of a layer carry LoRA is read from the base module's `dsft_lora_experts`
(all experts when unset); tokens routed to other experts see the base expert only, and gradients flow
to the selected experts' A/B only. W + BA is never formed.
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
    if isinstance(module, DsftExperts):  # sharded NF4 codes are neither parameters nor buffers
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
        self._index: dict[str, torch.Tensor] = {}
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
        rows = slice(base.first_expert, base.first_expert + base.num_experts)  # all of them, unless a slice is held
        for name, shape in shapes.items():
            weight = torch.zeros(shape, dtype=torch.float32, device=device)
            if name.endswith("_A"):  # PEFT's default LoRA init: A kaiming-uniform per expert, B zero
                nn.init.kaiming_uniform_(weight.view(-1, shape[-1]), a=math.sqrt(5))
            # initialised whole, as one process would (same seed, same values), then only the rows held kept
            getattr(self, name)[adapter_name] = Weight(weight[rows].clone() if base.global_experts else weight)
        self._register(adapter_name, r, lora_alpha, config, experts, index)

    def _register(self, adapter_name: str, r: int, lora_alpha: float, config: Any, experts: list[int],
                  index: torch.Tensor) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_scale(r, lora_alpha, config.use_rslora)
        self.lora_experts[adapter_name] = experts
        self._index[adapter_name] = index
        self.set_adapter(self.active_adapters)

    def _index_on(self, adapter_name: str, like: torch.Tensor) -> torch.Tensor:
        if self._index[adapter_name].device != like.device:
            self._index[adapter_name] = self._index[adapter_name].to(like.device)
        return self._index[adapter_name]

    def delta(self, adapter_name: str) -> ExpertDelta:
        num = self.get_base_layer().num_experts
        index = self._index_on(adapter_name, self.lora_gate_up_A[adapter_name].weight)
        get = lambda name: _expand(local(getattr(self, name)[adapter_name].weight), index, num)  # noqa: E731
        return ExpertDelta(get("lora_gate_up_A"), get("lora_gate_up_B"), get("lora_down_A"), get("lora_down_B"),
                           self.scaling[adapter_name])

    def get_delta_weight(self, adapter_name: str, expert: int, proj: str) -> torch.Tensor:
        """Expert `expert`'s weight change on `proj` (gate_proj, up_proj, down_proj): what a merge adds to it."""
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


def register(config: Any) -> Any:
    """Let PEFT put ExpertLoraLayer on DsftExperts modules named in `config.target_modules`."""
    config._register_custom_module({DsftExperts: ExpertLoraLayer})
    return config
