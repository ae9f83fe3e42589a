"""Switch off PEFT's transformers-v5 MoE rewrite for dsft's own adapters.

PEFT 0.21 rewrites every LoRA target ending in gate_proj/up_proj/down_proj/gate -- full module paths,
regexes and "all-linear" included -- into targets on the fused routed experts of DeepSeek models
(peft/utils/transformers_weight_conversion.py), both when creating a PeftModel and when loading an
adapter. For dsft the shared experts and dense MLP then silently get no LoRA and a reloaded adapter is
dropped or mis-shaped. dsft names its targets exactly, so the rewrite is never wanted: this context
manager replaces both conversion entry points with identities while PEFT runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# PEFT versions whose transformers_weight_conversion module dsft knows; newer ones are patched too
# as long as the two entry points still exist (checked below), older ones have no rewrite.
_ENTRY_POINTS = ("convert_peft_config_for_transformers", "convert_peft_adapter_state_dict_for_transformers")


def _keep_config(peft_config: Any, model: Any, conversions: Any) -> None:
    return None


def _keep_state_dict(model: Any, peft_config: Any, adapter_state_dict: dict, adapter_name: str = "default") -> dict:
    return adapter_state_dict


@contextlib.contextmanager
def no_moe_rewrite() -> Iterator[None]:
    try:
        from peft.utils import transformers_weight_conversion as twc
    except ImportError:  # PEFT before the rewrite existed, or transformers < 5
        yield
        return
    missing = [name for name in _ENTRY_POINTS if not hasattr(twc, name)]
    if missing:
        raise RuntimeError(f"this PEFT version changed {', '.join(missing)}; update dsft.adapters.peft_guard")
    saved = {name: getattr(twc, name) for name in _ENTRY_POINTS}
    twc.convert_peft_config_for_transformers = _keep_config
    twc.convert_peft_adapter_state_dict_for_transformers = _keep_state_dict
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(twc, name, fn)
