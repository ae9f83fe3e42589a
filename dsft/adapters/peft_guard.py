"""Keep PEFT's transformers-v5 MoE rewrite away from dsft's adapters.

PEFT 0.21 rewrites every LoRA target ending in gate_proj/up_proj/down_proj/gate -- full module paths,
regexes and "all-linear" included -- into targets on the fused routed experts of DeepSeek models
(peft/utils/transformers_weight_conversion.py), whenever an adapter is created, added or loaded. For
dsft the shared experts and dense MLP would silently get no LoRA and a reloaded adapter would be
dropped or mis-shaped. dsft names its targets exactly, so the rewrite is never wanted for its configs.

The rewrite also runs inside calls dsft does not make itself (TRL's DPO adds a "ref" adapter), so a
context manager around dsft's own calls is not enough: `install()` wraps PEFT's two entry points once,
and the wrappers skip the rewrite for dsft's configs and models (see `is_dsft`) while leaving every
other config and model to PEFT.
"""

from __future__ import annotations

from typing import Any

_ENTRY_POINTS = ("convert_peft_config_for_transformers", "convert_peft_adapter_state_dict_for_transformers")
_installed = False


def is_dsft(peft_config: Any, model: Any) -> bool:
    """A config built by dsft, or any adapter on a model whose experts dsft loaded (the Trainer
    restores checkpoints with a config read from disk, which carries no custom-module mapping)."""
    from dsft.moe.experts import DsftExperts

    if DsftExperts in (getattr(peft_config, "_custom_modules", None) or {}):
        return True
    return hasattr(model, "modules") and any(isinstance(m, DsftExperts) for m in model.modules())


def install() -> None:
    """Idempotent. A PEFT without the rewrite module (older PEFT, transformers < 5) needs nothing."""
    global _installed
    if _installed:
        return
    try:
        from peft.utils import transformers_weight_conversion as twc
    except ImportError:
        _installed = True
        return
    missing = [name for name in _ENTRY_POINTS if not hasattr(twc, name)]
    if missing:
        raise RuntimeError(f"this PEFT version changed {', '.join(missing)}; update dsft.adapters.peft_guard")
    convert_config, convert_state = (getattr(twc, name) for name in _ENTRY_POINTS)

    def config_guard(peft_config: Any, model: Any, conversions: Any) -> None:
        if not is_dsft(peft_config, model):
            convert_config(peft_config, model, conversions)

    def state_guard(model: Any, peft_config: Any, adapter_state_dict: dict, adapter_name: str = "default") -> dict:
        if is_dsft(peft_config, model):
            return adapter_state_dict
        return convert_state(model, peft_config, adapter_state_dict, adapter_name)

    twc.convert_peft_config_for_transformers = config_guard
    twc.convert_peft_adapter_state_dict_for_transformers = state_guard
    _installed = True
