"""`dsft export --format peft`: a run's adapter as stock PEFT loads it on a base stock transformers loaded,
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)`, expert LoRA included.

The run's own `adapter/` keeps dsft's layout (per-expert tensors of the selected experts only, read by
dsft for resume, eval, merge); this export is the same weight changes in PEFT 0.21's names and shapes:

- attention (and every module of a dense model): PEFT's LoRA on nn.Linear, `target_modules` by full name,
  `lora_A` [r, in], `lora_B` [out, r];
- on an MoE model, the shared experts' and dense MLP's gate/up/down (and any other module named like them):
  `target_parameters` with the full 2-D weight name (PEFT rewrites any `target_modules` entry ending in
  `.gate_proj` / `.up_proj` / `.down_proj` / `.gate` onto the routed experts of DeepSeek and Qwen models,
  whatever the prefix); a 2-D parameter LoRA is the same `W + s B A`;
- routed experts: `target_parameters` on the fused `P.gate_up_proj` [E, 2I, H] and `P.down_proj` [E, H, I].
  PEFT's ParamWrapper holds every expert: `lora_A` [r*E, in] expert-major (rows e*r .. e*r+r-1 are expert
  e's A) and `lora_B` [out, r*E] rank-major, expert-minor (column k*E + e is expert e's k-th column), so
  dsft's per-expert A (shared by gate and up) and B are written into those blocks and interleaved columns,
  experts the run did not adapt as zeros. The two wrappers nest on the experts module in the order its
  parameters are registered: `gate_up_proj` is the inner one (`P.base_layer.lora_*`), `down_proj` the
  outer (`P.lora_*`).

`r` / `lora_alpha` are the parameter targets' most common rank and alpha, and `rank_pattern` /
`alpha_pattern` hold, by exact name, only the targets that differ (PEFT scales each by alpha / r; it warns
about a pattern naming a parameter even though it applies it, so none is written where none is needed); `lora_dropout` is 0 (ParamWrapper refuses dropout), which changes nothing at inference.
What PEFT cannot express is refused with one line: a router trained whole (`adapter.router: trainable`) and
whole trained experts (`routed_experts.mode: full`); merge those (`dsft merge`).

An FP8 block-scaled base (DeepSeek-V3/R1 as released) is not loaded as it is: on CPU stock transformers
mis-scales its partial edge blocks (the tiny V3's 40-row kv_a_proj_with_mqa, silently) or refuses them (V3's
576-row one), and on a GPU builds FP8 modules to which PEFT adds the LoRA of
the MLPs and experts before the block scale (~3e-5 of the update lands). `load_recipe` says to dequantize it
first (`dsft convert`, dsft.export.dequantize) and load that.

`check` builds the base's architecture with no weights (meta device) from its config as the load recipe
gives it to transformers (`as_loaded`: quantization_config included; a quantized config is refused), applies
this export's config with PEFT exactly as `PeftModel.from_pretrained` does, and compares PEFT's config afterwards (unchanged: nothing
rewritten onto the experts) and the adapter tensors PEFT expects (names and shapes) with the written ones.
It runs on every export before it is renamed into place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from dsft import arch
from dsft.adapters.weights import Adapter
from dsft.errors import DsftError
from dsft.models.fp8 import block_size, dequantized_config

PREFIX = "base_model.model."
# module names PEFT moves from target_modules onto the routed experts (peft.utils.transformers_weight_conversion)
MOVED = ("gate_proj", "up_proj", "down_proj", "gate", "w1", "w2", "w3")


def refuse(adapter: Adapter, config: dict[str, Any]) -> None:
    if adapter.replace:
        raise DsftError(f"--format peft: the run trains {next(iter(adapter.replace)).removesuffix('.weight')} whole "
                        "(adapter.router: trainable), which a PEFT LoRA adapter cannot hold; merge the run instead "
                        "(dsft merge) and load the merged checkpoint")
    if any(ex.full for ex in adapter.experts.values()):
        raise DsftError("--format peft: the run trains whole experts (routed_experts.mode: full), which a PEFT LoRA "
                        "adapter cannot hold; merge the run instead (dsft merge) and load the merged checkpoint")


def _pattern(name: str) -> str:
    return re.escape(name)


def peft_tensors(adapter: Adapter, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the adapter's tensors in PEFT's names and layout, the LoraConfig fields that target them)."""
    moe = arch.num_experts(config) > 0
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    parameters: list[str] = []
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, (a, b, scale) in sorted(adapter.linear.items()):
        module = key.removesuffix(".weight")
        r = a.shape[0]
        if moe and module.rsplit(".", 1)[-1] in MOVED:
            parameters.append(key)
            name = key
        else:
            modules.append(module)
            name = module
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.float().contiguous()
        ranks[_pattern(name)], alphas[_pattern(name)] = r, scale * r
    if adapter.experts:
        experts = arch.num_experts(config)
        for module, ex in sorted(adapter.experts.items()):
            t = ex.tensors
            r = t["lora_gate_up_A"].shape[1]
            for proj, inner in (("gate_up_proj", True), ("down_proj", False)):
                a_part, b_part = t[f"lora_{proj[:-5]}_A"].float(), t[f"lora_{proj[:-5]}_B"].float()
                a = torch.zeros(experts, r, a_part.shape[-1])
                b = torch.zeros(b_part.shape[1], r, experts)
                for i, e in enumerate(ex.ids):
                    a[e] = a_part[i]
                    b[:, :, e] = b_part[i]
                where = f"{PREFIX}{module}{'.base_layer' if inner else ''}"
                tensors[f"{where}.lora_A.weight"] = a.reshape(experts * r, -1).contiguous()
                tensors[f"{where}.lora_B.weight"] = b.reshape(b.shape[0], r * experts).contiguous()
                parameters.append(f"{module}.{proj}")
                ranks[_pattern(f"{module}.{proj}")], alphas[_pattern(f"{module}.{proj}")] = r, ex.scale * r
    return tensors, {"target_modules": modules, "target_parameters": parameters,
                     **patterns(ranks, alphas, {_pattern(p) for p in parameters})}


def patterns(ranks: dict[str, int], alphas: dict[str, float], parameters: set[str]) -> dict[str, Any]:
    """r / lora_alpha and the patterns for the targets that differ from them. The default is the parameter
    targets' most common (rank, alpha), else the modules': PEFT 0.21 looks a parameter's rank up by its full
    name but warns about any pattern matching no targeted *module*, so a pattern is written only where a
    target's rank or alpha differs from the default (`unmatched_warning` counts those PEFT will warn about)."""
    from collections import Counter

    pairs = {k: (ranks[k], alphas[k]) for k in ranks}
    pool = [v for k, v in pairs.items() if k in parameters] or list(pairs.values())
    r0, a0 = Counter(pool).most_common(1)[0][0] if pool else (8, 8.0)
    differ = sorted(k for k, v in pairs.items() if v != (r0, a0))
    return {"r": r0, "lora_alpha": a0, "rank_pattern": {k: ranks[k] for k in differ if ranks[k] != r0},
            "alpha_pattern": {k: alphas[k] for k in differ if alphas[k] != a0}}


def unmatched_warning(config: dict[str, Any]) -> int:
    """Pattern keys naming parameters, which stock PEFT 0.21 applies and still lists as "did not match any
    targeted module and were ignored" (its check looks at module names only)."""
    params = {_pattern(p) for p in config.get("target_parameters") or ()}
    return len({*config.get("rank_pattern", {}), *config.get("alpha_pattern", {})} & params)


def build(adapter: Adapter, config: dict[str, Any], base: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, adapter_config.json, facts for the export's record) for dsft.export.unmerged."""
    tensors, fields = peft_tensors(adapter, config)
    return tensors, adapter_config(fields, base), {"target_modules": len(fields["target_modules"]),
                                                   "target_parameters": len(fields["target_parameters"]),
                                                   "pattern_keys_peft_warns_about": unmatched_warning(fields)}


def adapter_config(fields: dict[str, Any], base: str) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, **fields,
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}


def as_loaded(config: dict[str, Any]) -> dict[str, Any]:
    """The base's config as the printed load recipe gives it to transformers: an FP8 block-scaled base through
    `dsft convert` (dequantized, no quantization_config; `load_recipe`), any other as it is."""
    return dequantized_config(config) if block_size(config) is not None else config


def load_recipe(base: Path, out: Path) -> list[str]:
    """The lines that load the export with stock transformers + PEFT (an FP8 base first dequantized)."""
    config = json.loads((base / "config.json").read_text())
    load = lambda b: f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{b}"), "{out}")'  # noqa: E731
    if block_size(config) is None:
        return [load(base)]
    plain = base.with_name(f"{base.name}-bf16")
    return [f"dsft convert --model {base} --out {plain}   (once: the FP8 weights dequantized to bf16, partial edge "
            "blocks exact; add --dtype float32 for exactly dsft's values, at twice the size)", load(plain)]


def check(directory: Path, base: Path) -> list[str]:
    """What stock PEFT would do differently from what the export says: one line each (see the module doc)."""
    import tempfile
    import warnings

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    written = json.loads((directory / "adapter_config.json").read_text())
    fields = {k: v for k, v in written.items() if k in LoraConfig.__dataclass_fields__}
    lora = LoraConfig(**fields)
    config = as_loaded(json.loads((base / "config.json").read_text()))
    quant = config.get("quantization_config")
    if quant:
        return [f"{base}/config.json: quantization_config {quant.get('quant_method')!r}: stock transformers would build "
                "quantized modules, and PEFT adds LoRA to their stored values before the scale; load the base "
                "dequantized (`dsft convert`) and export for that"]
    with torch.device("meta"), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp))
        peft_model = get_peft_model(model, lora)
    problems = []
    after, tuner = peft_model.peft_config["default"], peft_model.base_model
    # PEFT may write a long target_modules list as its shortest equivalent suffixes; what counts is which
    # modules and parameters it wrapped, and that no target moved (onto the routed experts, say)
    wrapped = {"target_modules": set(tuner.targeted_module_names) - set(tuner.targeted_parameter_names),
               "target_parameters": set(tuner.targeted_parameter_names)}
    for key in ("target_modules", "target_parameters"):
        if wrapped[key] != set(written.get(key) or ()):
            moved = sorted(wrapped[key] ^ set(written.get(key) or ()))
            problems.append(f"adapter_config.json: PEFT applies {key} elsewhere than written ({moved[0]}; "
                            f"written {len(written.get(key) or ())}, wrapped {len(wrapped[key])})")
    if set(getattr(after, "target_parameters", None) or ()) != set(written.get("target_parameters") or ()):
        problems.append("adapter_config.json: PEFT rewrites target_parameters on load")
    for key in ("rank_pattern", "alpha_pattern"):
        if dict(getattr(after, key) or {}) != dict(written.get(key) or {}):
            problems.append(f"adapter_config.json: PEFT rewrites {key} on load")
    expected = {k: list(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        found = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    for k in sorted(expected.keys() - found.keys()):
        problems.append(f"{k}: PEFT expects this tensor and the export lacks it")
    for k in sorted(found.keys() - expected.keys()):
        problems.append(f"{k}: PEFT would ignore this tensor")
    for k in sorted(expected.keys() & found.keys()):
        if expected[k] != found[k]:
            problems.append(f"{k}: shape {found[k]}, PEFT expects {expected[k]}")
    return problems
