"""Turn `recipe.adapter` into exact LoRA targets and a PEFT LoraConfig.

Targets are full module paths found by walking the model, grouped as the recipe names them:
attention (MLA or q/k/v/o projections), shared_experts (DeepSeek's `shared_experts`, Qwen2-MoE's
`shared_expert`), dense_mlp (the MLP of the dense layers), and
routed_experts (dsft's expert LoRA on chosen experts of DsftExperts modules, see dsft.moe.lora).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsft.adapters import peft_guard
from dsft.config.schema import AdapterSection
from dsft.moe.fused import fuse
from dsft.moe.experts import DsftExperts, layer_of

GROUPS = ("attention", "shared_experts", "dense_mlp", "routed_experts")
ATTENTION_LEAVES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "k_proj", "v_proj", "o_proj")
MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")
_LAYER = r"(?:^|\.)layers\.\d+\."
_PATTERNS = {
    "attention": re.compile(_LAYER + r"self_attn\.(" + "|".join(ATTENTION_LEAVES) + r")$"),
    "shared_experts": re.compile(_LAYER + r"mlp\.shared_experts?\.(" + "|".join(MLP_LEAVES) + r")$"),
    "dense_mlp": re.compile(_LAYER + r"mlp\.(" + "|".join(MLP_LEAVES) + r")$"),
}


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear or one of its quantized subclasses (bitsandbytes Linear4bit is one)."""
    return isinstance(module, nn.Linear)


def module_group(name: str) -> str | None:
    for group, pattern in _PATTERNS.items():
        if pattern.search(name):
            return group
    return None


def iter_group_modules(model: nn.Module) -> Iterator[tuple[str, str]]:
    """(group, module name) for every linear layer dsft can put LoRA on."""
    for name, module in model.named_modules():
        group = module_group(name)
        if group and _is_linear(module):
            yield group, name


def plan_targets(model: nn.Module, adapter: AdapterSection,
                 selection: dict[int, list[int] | None] | None = None) -> dict[str, list[str]]:
    """The enabled groups and their module names. Routed-expert modules named here get their
    selected expert ids (`selection`: layer -> ids, None for all) as `dsft_lora_experts`."""
    targets: dict[str, list[str]] = {g: [] for g in GROUPS if getattr(adapter, g).enabled}
    for group, name in iter_group_modules(model):
        if group in targets:
            targets[group].append(name)
    if "routed_experts" in targets:
        for name, module in model.named_modules():
            if isinstance(module, DsftExperts) and layer_of(name) in (selection or {}):
                module.dsft_lora_experts = selection[layer_of(name)]
                module.dsft_expert_mode = adapter.routed_experts.mode
                targets["routed_experts"].append(name)
    return {g: names for g, names in targets.items() if names}  # a dense model has no shared experts


def router_names(model: nn.Module) -> list[str]:
    from dsft.moe.routing import routers

    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in routers(model).values()]


def lora_config(adapter: AdapterSection, targets: dict[str, list[str]], modules_to_save: list[str] | None = None) -> Any:
    """recipe.adapter + planned targets -> peft.LoraConfig with per-group rank/alpha. A trainable router
    is trained whole through PEFT's `modules_to_save` (its correction bias is a buffer: frozen)."""
    from peft import LoraConfig

    from dsft.moe.lora import register

    names = [n for group in targets.values() for n in group]
    rank_pattern, alpha_pattern = {}, {}
    for group, modules in targets.items():
        r, alpha = adapter.rank_alpha(group)
        for name in modules:
            if r != adapter.r:
                rank_pattern[f"^{re.escape(name)}$"] = r
            if alpha != adapter.alpha:
                alpha_pattern[f"^{re.escape(name)}$"] = alpha
    return register(LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=names,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save or None,
    ))


def lora_modules(model: nn.Module) -> list[str]:
    """Names (without PEFT's prefixes) of the modules that actually carry LoRA weights."""
    from dsft.moe.lora import ExpertLoraLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, ExpertLoraLayer) or (hasattr(module, "lora_A") and len(getattr(module, "lora_A")) > 0):
            found.append(name.removeprefix("base_model.model."))
    return found


def half_precision_inputs(model: nn.Module) -> None:
    """On a bf16/fp16 base, stop PEFT from copying each LoRA input to the fp32 masters' dtype.

    PEFT casts x to fp32, runs LoRA in fp32 and promotes the residual add to fp32: several
    full-size passes per adapted layer. dsft trains half-precision bases under autocast (the
    Trainer's bf16/fp16 mode, and dsft's own eval), where LoRA runs in half precision from the
    half-precision input directly, the masters staying fp32.
    """
    from peft.tuners.lora.layer import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            dtype = getattr(base, "compute_dtype", None) or getattr(getattr(base, "weight", None), "dtype", None)
            if dtype in (torch.bfloat16, torch.float16):
                module.cast_input_dtype_enabled = False


def attach_lora(model: nn.Module, adapter: AdapterSection,
                selection: dict[int, list[int] | None] | None = None) -> tuple[nn.Module, dict[str, list[str]]]:
    """Wrap `model` with LoRA exactly on the planned modules, and check that is where it landed."""
    from peft import get_peft_model

    targets = plan_targets(model, adapter, selection)
    peft_guard.install()
    trained_routers = router_names(model) if adapter.router == "trainable" else None
    peft_model = get_peft_model(model, lora_config(adapter, targets, trained_routers))
    half_precision_inputs(peft_model)
    fuse(peft_model)
    wanted = sorted(n for group in targets.values() for n in group)
    got = sorted(lora_modules(peft_model))
    if wanted != got:
        raise RuntimeError(f"LoRA landed on {len(got)} modules instead of the {len(wanted)} planned ones: "
                           f"missing {sorted(set(wanted) - set(got))[:5]}, extra {sorted(set(got) - set(wanted))[:5]}")
    return peft_model, targets


def check_fits(model: nn.Module, adapter: Any, adapter_dir: str) -> None:
    """Every LoRA'd Linear of the adapter exists in `model` with the shape its A and B imply."""
    from dsft.errors import DsftError

    modules = dict(model.named_modules())
    for key, (out, inp) in adapter.shapes.items():
        module = modules.get(key.removesuffix(".weight"))
        if module is None or not _is_linear(module):
            raise DsftError(f"{adapter_dir}: the adapter changes {key}, which this model has no Linear for; it was "
                            "trained on another architecture")
        if (module.out_features, module.in_features) != (out, inp):
            raise DsftError(f"{adapter_dir}: {key} is [{module.out_features}, {module.in_features}] in this model, the "
                            f"adapter expects [{out}, {inp}]: another architecture or size")


def load_lora(model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> nn.Module:
    """PeftModel.from_pretrained without PEFT's MoE rewrite (dsft.adapters.peft_guard), with dsft's expert LoRA restored
    on the experts recorded in the adapter's dsft_adapter.json."""
    from peft import LoraConfig

    from dsft.adapters.metadata import read_metadata
    from dsft.adapters.weights import read_adapter
    from dsft.moe.lora import register

    check_fits(model, read_adapter(Path(adapter_dir), "--adapter", model.config.to_dict(), keep=False), adapter_dir)
    routed = read_metadata(adapter_dir).get("routed_experts", {})
    selection = routed.get("experts", {})
    for name, module in model.named_modules():
        if isinstance(module, DsftExperts) and str(layer_of(name)) in selection:
            module.dsft_lora_experts = selection[str(layer_of(name))]
            module.dsft_expert_mode = routed.get("mode", "lora")
    config = register(LoraConfig.from_pretrained(adapter_dir))
    peft_guard.install()
    if any(isinstance(m, DsftExperts) and m.global_experts for m in model.modules()):
        peft_model = _load_held(model, Path(adapter_dir), config)
    else:
        peft_model = _load_whole(model, adapter_dir, config, is_trainable)
    half_precision_inputs(peft_model)
    fuse(peft_model)
    return peft_model


def _load_whole(model: nn.Module, adapter_dir: str, config: Any, is_trainable: bool) -> nn.Module:
    """PEFT's own load, its missing-keys warning made an error."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=is_trainable)
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    if missing:  # PEFT only warns, and the adapter would run without those weights
        from dsft.errors import DsftError

        raise DsftError(f"{adapter_dir}: the adapter does not fit this model ({missing[0][:300]}); "
                        "it was written for another model or by an older dsft: train it again")
    return peft_model


def _load_held(model: nn.Module, adapter_dir: Path, config: Any) -> nn.Module:
    """The adapter, trainable, on a model holding only this rank's routed experts (expert parallelism): its layers
    built as for a fresh adapter (expert LoRA in this rank's padded slots), then the saved weights read in, of each
    expert LoRA tensor only the rows of this rank's experts (safetensors slices)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open

    from dsft.errors import DsftError
    from dsft.moe.lora import ExpertLoraLayer

    config.inference_mode = False
    peft_model = get_peft_model(model, config)
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, ExpertLoraLayer) and m.slots}
    state = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt", device="cpu") as handle:
        for key in handle.keys():
            layer = layers.get(key.split(".lora_")[0]) if ".experts.lora_" in key else None
            if layer is None:
                state[key] = handle.get_tensor(key)
                continue
            state[key] = layer.into_block("default", handle.get_slice(key)[layer.saved_rows("default")])
    result = set_peft_model_state_dict(peft_model, state, adapter_name="default")
    missing = [k for k in result.missing_keys if ".default." in k and "lora_" in k]
    if missing:
        raise DsftError(f"{adapter_dir}: the adapter does not fit this model (no weights for {missing[:3]}); "
                        "it was written for another model or by an older dsft: train it again")
    return peft_model
