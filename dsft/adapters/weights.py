"""An adapter directory read back and checked: the one reader every command goes through.

The tensors are the truth. `read_adapter` reads adapter_config.json, dsft_adapter.json and the weights,
and refuses (one line naming the file, the tensor or the key) whatever would make a merge, an export or a
loaded adapter silently differ from what was trained:

- adapter_config.json: a LoRA config whose rank `r`, `lora_alpha`, `rank_pattern` and `alpha_pattern` are
  numbers; PEFT features whose weight change is not `s * B @ A` (DoRA, LoRA biases, fan-in-fan-out
  layouts, layer replication, parameter LoRA, trainable tokens, ...) are refused by name: dsft would merge
  them wrongly, PEFT's own `merge_and_unload` merges them.
- every tensor finite and floating-point; a module's A [r, in] and B [out, r] agree with each other and
  with the rank adapter_config.json gives that module (PEFT's own pattern rule, `module_rank_alpha`).
- routed experts: dsft_adapter.json lists each adapted layer's expert ids (integers, unique, within the
  base's experts), as many as the weights hold, with the rank and alpha the weights and
  adapter_config.json have; every listed layer has weights and every layer with weights is listed.
- the groups dsft_adapter.json records name exactly the modules the weights hold, at their rank and alpha.

The scale of each module (`lora_scale` of its rank and alpha from adapter_config.json, as PEFT computes it
when it loads the adapter) is read here once; merge, export and verify take it from the `Adapter`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.arch import expert_intermediate, layer_index, num_experts, selects
from dsft.errors import DsftError, shown
from dsft.moe.lora import lora_scale

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
EXPERT_LORA = {"lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"}
EXPERT_FULL = {"lora_full_gate_up", "lora_full_down"}
DAMAGED = "the adapter is damaged or was edited: train it again or restore its files"

# adapter_config.json keys whose weight change is not W + s B A (or that dsft does not place): (set?, what)
UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA (use_dora: true)",
    "lora_bias": "LoRA biases (lora_bias: true)",
    "fan_in_fan_out": "fan-in-fan-out weights (fan_in_fan_out: true)",
    "use_qalora": "QA-LoRA (use_qalora: true)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "megatron_config": "Megatron-parallel LoRA (megatron_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


@dataclass
class Experts:
    ids: list[int]
    tensors: dict[str, torch.Tensor]  # lora_gate_up_A ... or lora_full_gate_up / lora_full_down
    scale: float

    @property
    def full(self) -> bool:
        return "lora_full_gate_up" in self.tensors


@dataclass
class Adapter:
    """An adapter as per-module weight changes in the model's module names (PREFIX removed)."""

    linear: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # base key -> A, B, s
    replace: dict[str, torch.Tensor] = field(default_factory=dict)
    experts: dict[str, Experts] = field(default_factory=dict)  # experts module -> its adapter
    nbytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # LoRA'd Linear's weight key -> [out, in] (always filled)

    def touches(self, key: str) -> bool:
        return selects(key, self.linear.keys() | self.replace.keys(), {m: e.ids for m, e in self.experts.items()})

    def targets(self) -> list[str]:
        return [*self.linear, *self.replace]


def _number(value: Any, integer: bool = False) -> bool:
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int) and value > 0
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The rank_pattern / alpha_pattern key PEFT applies to `module` (the first that matches
    `(.*\\.)?(KEY)$`, peft.utils.other.get_pattern_key), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives `module` when it loads this adapter_config.json."""
    rank_key = pattern_key(config.get("rank_pattern") or {}, module)
    alpha_key = pattern_key(config.get("alpha_pattern") or {}, module)
    r = config["rank_pattern"][rank_key] if rank_key is not None else config["r"]
    alpha = config["alpha_pattern"][alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    return r, alpha


def check_config(config: dict[str, Any], path: Path) -> None:
    """adapter_config.json describes a LoRA whose weight change dsft computes exactly."""
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise DsftError(f"{path}: peft_type {kind!r}; dsft reads LoRA adapters only (merge others with PEFT)")
    used = [what for key, what in UNSUPPORTED.items() if config.get(key) not in (None, False, [], {}, "")]
    if config.get("bias", "none") != "none":
        used.append(f"trained biases (bias: {config['bias']!r})")
    if used:
        raise DsftError(f"{path}: the adapter uses {', '.join(used)}, whose weight change dsft does not compute; "
                        "merge it with PEFT's merge_and_unload, or train a plain LoRA")
    if "r" not in config:
        raise DsftError(f"{path}: no LoRA rank `r`; not a LoRA adapter config ({DAMAGED})")
    if not _number(config.get("r"), integer=True):
        raise DsftError(f"{path}: r must be a positive integer (got {shown(config.get('r'))}); {DAMAGED}")
    if "lora_alpha" in config and not _number(config["lora_alpha"]):
        raise DsftError(f"{path}: lora_alpha must be a positive finite number (got {shown(config['lora_alpha'])}); {DAMAGED}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise DsftError(f"{path}: {key} must be a mapping of module patterns to numbers; {DAMAGED}")
        bad = next((k for k, v in patterns.items() if not _number(v, integer)), None)
        if bad is not None:
            raise DsftError(f"{path}: {key}[{bad!r}] must be a positive {'integer' if integer else 'number'} "
                            f"(got {shown(patterns[bad])}); {DAMAGED}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise DsftError(f"{path}: use_rslora must be true or false; {DAMAGED}")


def _split(key: str) -> tuple[str, str]:
    """(module, part) of a LoRA tensor key: `...q_proj`, `lora_A.weight`; `...mlp.experts`, `lora_down_A`."""
    module, _, part = key.partition(".lora_")
    part = "lora_" + part
    return module, part.removesuffix(".weight") if module.endswith(".mlp.experts") else part


def _finite(name: str, tensor: torch.Tensor, where: Path) -> None:
    if not tensor.is_floating_point():
        raise DsftError(f"{where}: tensor {name} is {tensor.dtype}, not floating point; {DAMAGED}")
    if not bool(torch.isfinite(tensor).all()):
        what = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
        raise DsftError(f"{where}: tensor {name} holds {what} values; the adapter is unusable (training diverged, or "
                        "the file was damaged): train it again from an earlier checkpoint or with a lower lr")


def check_finite(weights: Path) -> None:
    """Every tensor of a safetensors file is floating point and finite (one tensor in memory at a time)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            _finite(key, f.get_tensor(key), weights)


class _Reader:
    def __init__(self, adapter_dir: Path, key: str, base_config: dict[str, Any] | None) -> None:
        from dsft.adapters.metadata import read_metadata
        from dsft.outputs import read_json

        self.dir, self.key, self.base = adapter_dir, key, base_config
        self.weights_path, self.config_path = adapter_dir / WEIGHTS, adapter_dir / CONFIG
        self.config = read_json(self.config_path, DAMAGED)
        check_config(self.config, self.config_path)
        self.meta = read_metadata(adapter_dir)
        self.meta_path = adapter_dir / "dsft_adapter.json"

    def fail(self, where: Path, what: str) -> DsftError:
        return DsftError(f"{where}: {what}; {DAMAGED}")

    def shapes(self) -> dict[str, list[int]]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.weights_path), framework="pt") as f:
                return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise DsftError(f"{self.key}: {self.weights_path} cannot be read ({str(e).splitlines()[0][:160]}); "
                            f"{DAMAGED}") from None

    def structure(self, shapes: dict[str, list[int]]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        """({module: {part: tensor key}} of LoRA tensors, {module weight: tensor key} of modules trained whole)."""
        lora: dict[str, dict[str, str]] = {}
        replace: dict[str, str] = {}
        for key in shapes:
            name = key.removeprefix(PREFIX)
            if ".lora_" in name:
                module, part = _split(name)
                lora.setdefault(module, {})[part] = key
            elif name.endswith(".weight"):  # a module trained whole (modules_to_save: the router)
                replace[name] = key
        return lora, replace

    def linear(self, module: str, parts: dict[str, str], shapes: dict[str, list[int]]) -> float:
        if set(parts) != {"lora_A.weight", "lora_B.weight"}:
            raise self.fail(self.weights_path, f"{module} has LoRA weights {sorted(parts)}, not lora_A and lora_B "
                            "(a LoRA variant dsft does not merge)")
        a, b = shapes[parts["lora_A.weight"]], shapes[parts["lora_B.weight"]]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise self.fail(self.weights_path, f"{module}: lora_A {a} and lora_B {b} are not a rank-r pair [r, in] / [out, r]")
        r, alpha = module_rank_alpha(self.config, module)
        if a[0] != r:
            raise self.fail(self.weights_path, f"{module} has rank {a[0]} (lora_A {a}) but {CONFIG} gives it r {r}")
        return lora_scale(r, alpha, bool(self.config.get("use_rslora")))

    def experts(self, module: str, parts: dict[str, str], shapes: dict[str, list[int]]) -> tuple[list[int], float]:
        layer = str(layer_index(module))
        routed = self.meta.get("routed_experts")
        if not isinstance(routed, dict) or not isinstance(routed.get("experts"), dict) or layer not in routed["experts"]:
            raise self.fail(self.meta_path if self.meta else self.dir,
                            f"{WEIGHTS} holds expert weights for layer {layer}, but dsft_adapter.json lists no experts "
                            "for it (routed_experts.experts)")
        ids = routed["experts"][layer]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise self.fail(self.meta_path, f"routed_experts.experts[{layer!r}] must be a list of expert ids "
                            f"(got {shown(ids)})")
        if len(set(ids)) != len(ids) or min(ids) < 0:
            raise self.fail(self.meta_path, f"routed_experts.experts[{layer!r}] {shown(ids)} repeats an id or has a negative one")
        if self.base is not None and max(ids) >= num_experts(self.base):
            raise self.fail(self.meta_path, f"routed_experts.experts[{layer!r}] lists expert {max(ids)}, but the base "
                            f"has {num_experts(self.base)} experts per layer")
        mode = routed.get("mode", "lora")
        want = EXPERT_FULL if mode == "full" else EXPERT_LORA
        if set(parts) != want:
            raise self.fail(self.weights_path, f"{module} holds {sorted(parts)}; routed_experts.mode {mode!r} in "
                            f"dsft_adapter.json means {sorted(want)}")
        dims = {p: shapes[k] for p, k in parts.items()}
        counts = {p: d[0] if len(d) == 3 else None for p, d in dims.items()}
        if any(c != len(ids) for c in counts.values()):
            p = next(p for p, c in counts.items() if c != len(ids))
            raise self.fail(self.meta_path, f"routed_experts.experts[{layer!r}] lists {len(ids)} experts {shown(ids)}, "
                            f"but {module}.{p} is {dims[p]} (one [..] block per expert)")
        if mode == "full":
            return ids, 1.0
        r, alpha = module_rank_alpha(self.config, module)
        (_, ra, hidden), (_, two_inter, rb) = dims["lora_gate_up_A"], dims["lora_gate_up_B"]
        (_, rc, inter), (_, hidden_b, rd) = dims["lora_down_A"], dims["lora_down_B"]
        if len({ra, rb, rc, rd}) != 1 or hidden != hidden_b or two_inter != 2 * inter:
            raise self.fail(self.weights_path, f"{module}: expert LoRA shapes {dims} do not fit together")
        if ra != r:
            raise self.fail(self.weights_path, f"{module} has rank {ra} but {CONFIG} gives it r {r}")
        for name, value, want_value in (("r", routed.get("r"), r), ("alpha", routed.get("alpha"), alpha)):
            if value is not None and (not _number(value) or float(value) != float(want_value)):
                raise self.fail(self.meta_path, f"routed_experts.{name} is {shown(value)}, but the weights and "
                                f"{CONFIG} give {want_value}")
        if self.base is not None and (hidden != self.base.get("hidden_size") or inter != expert_intermediate(self.base)):
            raise DsftError(f"{self.key}: {module} expert LoRA is for experts of width {hidden} x {inter}, the base has "
                            f"{self.base.get('hidden_size')} x {expert_intermediate(self.base)}: another model")
        return ids, lora_scale(r, alpha, bool(self.config.get("use_rslora")))

    def groups(self, lora: dict[str, dict[str, str]]) -> None:
        """dsft_adapter.json's groups name exactly the LoRA'd Linears, at the rank and alpha they have."""
        groups = self.meta.get("groups")
        if not self.meta or groups is None:
            return
        if not isinstance(groups, dict):
            raise self.fail(self.meta_path, "groups must be a mapping")
        recorded: dict[str, str] = {}
        for group, spec in groups.items():
            modules = spec.get("modules") if isinstance(spec, dict) else None
            if not isinstance(modules, list):
                raise self.fail(self.meta_path, f"groups.{group}.modules must be a list of module names")
            for module in modules:
                recorded[module] = group
                if module not in lora:
                    raise self.fail(self.meta_path, f"groups.{group} lists {module}, which has no weights in {WEIGHTS}")
                r, alpha = module_rank_alpha(self.config, module)
                for name, want in (("r", r), ("alpha", alpha)):
                    value = spec.get(name)
                    if value is not None and (not _number(value) or float(value) != float(want)):
                        raise self.fail(self.meta_path, f"groups.{group}.{name} is {shown(value)}, but {CONFIG} gives "
                                        f"{module} {name} {want}")
        extra = sorted(m for m in lora if not m.endswith(".mlp.experts") and m not in recorded)
        if extra:
            raise self.fail(self.meta_path, f"{WEIGHTS} holds LoRA weights for {extra[0]}"
                            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}, which no group lists")

    def read(self, keep: bool) -> Adapter:
        from safetensors import safe_open

        shapes = self.shapes()
        lora, replace = self.structure(shapes)
        adapter = Adapter(meta=self.meta, config=self.config)
        adapter.shapes = {m + ".weight": [shapes[p["lora_B.weight"]][0], shapes[p["lora_A.weight"]][1]]
                          for m, p in lora.items() if "lora_A.weight" in p and "lora_B.weight" in p}
        linear_scales = {m: self.linear(m, p, shapes) for m, p in lora.items() if not m.endswith(".mlp.experts")}
        expert_specs = {m: self.experts(m, p, shapes) for m, p in lora.items() if m.endswith(".mlp.experts")}
        routed = self.meta.get("routed_experts") or {}
        listed = routed.get("experts") or {} if isinstance(routed, dict) else None
        if not isinstance(listed, dict) or not all(str(layer).isdigit() for layer in listed):
            raise self.fail(self.meta_path, "routed_experts.experts must map layer numbers to lists of expert ids")
        weighted = {str(layer_index(m)) for m in expert_specs}
        unweighted = sorted(str(layer) for layer in listed if str(layer) not in weighted)
        if unweighted:
            raise self.fail(self.meta_path, f"routed_experts.experts lists layer {unweighted[0]}, but {WEIGHTS} holds "
                            "no expert weights for it")
        self.groups(lora)
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(self.weights_path), framework="pt") as f:
            for key in shapes:
                t = f.get_tensor(key)
                _finite(key, t, self.weights_path)
                adapter.nbytes += t.numel() * t.element_size()
                if keep:
                    tensors[key] = t
        if not keep:
            return adapter
        for module, parts in lora.items():
            if module in expert_specs:
                ids, scale = expert_specs[module]
                adapter.experts[module] = Experts(ids, {p: tensors[k] for p, k in parts.items()}, scale)
            else:
                adapter.linear[module + ".weight"] = (tensors[parts["lora_A.weight"]], tensors[parts["lora_B.weight"]],
                                                      linear_scales[module])
        adapter.replace = {name: tensors[k] for name, k in replace.items()}
        return adapter


_CHECKED: dict[tuple, Adapter] = {}


def _stamp(adapter_dir: Path) -> tuple:
    stats = []
    for name in (WEIGHTS, CONFIG, "dsft_adapter.json"):
        try:
            st = os.stat(adapter_dir / name)
            stats.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            stats.append((name, None))
    return (str(adapter_dir.resolve()), *stats)


def read_adapter(adapter_dir: Path, key: str = "--adapter", base_config: dict[str, Any] | None = None,
                 keep: bool = True) -> Adapter:
    """The adapter in `adapter_dir`, every check above passed (against `base_config` too when given).
    `keep=False` checks without holding the tensors (one at a time is read), for commands that then let
    PEFT load them; a check of unchanged files is remembered for this process."""
    adapter_dir = Path(adapter_dir)
    stamp = (_stamp(adapter_dir), None if base_config is None else json.dumps(base_config, sort_keys=True, default=str))
    if not keep and stamp in _CHECKED:
        return _CHECKED[stamp]
    adapter = _Reader(adapter_dir, key, base_config).read(keep)
    if not keep:
        _CHECKED[stamp] = adapter
    return adapter


def check_adapter_dir(adapter_dir: Path, key: str = "--adapter", base_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Before PEFT or the merge reads an adapter directory: its files are there and safe to read (pickle
    weights are never unpickled), and read_adapter's checks pass. Returns adapter_config.json."""
    from dsft.models.files import safetensors_header
    from dsft.outputs import read_json

    read_json(adapter_dir / CONFIG, DAMAGED)
    weights = adapter_dir / WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in adapter_dir.glob("*.bin"))
        if pickles:
            raise DsftError(f"{key} {adapter_dir}: holds only pickle weights ({', '.join(pickles)}); dsft never unpickles: "
                            f"save the adapter as {WEIGHTS} (PEFT's default, safe_serialization=True)")
        raise DsftError(f"{key} {adapter_dir}: no {WEIGHTS}; {DAMAGED}")
    try:
        safetensors_header(weights)
    except ValueError as e:
        raise DsftError(f"{key}: {e}") from None
    return read_adapter(adapter_dir, key, base_config, keep=False).config
