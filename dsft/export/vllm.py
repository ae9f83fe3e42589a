"""`dsft export --format vllm`: a run's adapter as vLLM serves it unmerged (`vllm serve BASE --enable-lora
--lora-modules legal=DIR ...`), so several domain adapters share one copy of the base.

What vLLM's LoRA loader reads (vLLM's lora/ and model sources, 0.12+; checked against them, not run here):
- tensors named `*.lora_A.weight` / `*.lora_B.weight` only: no `modules_to_save`, no lm_head LoRA;
- one `r`, `lora_alpha` and `use_rslora` from adapter_config.json, one scaling for every module
  (`rank_pattern` / `alpha_pattern` are ignored): dsft folds each module's own scale (its group's
  alpha / r) into lora_B and writes r = lora_alpha = the largest rank, so vLLM's scaling is 1;
- routed-expert LoRA of model classes whose experts are per-expert 2-D weights (DeepSeek-V2/V3 and
  Qwen2/3-MoE: `is_3d_moe_weight` False) as per-expert keys
  `...mlp.experts.{e}.{gate_proj,up_proj,down_proj}.lora_{A,B}.weight`, with every expert of an adapted
  layer present with all three projections (its MoE packing asserts that): experts the run did not
  adapt are written as zeros.

What vLLM cannot serve is refused with one line (exit 2): a router trained whole, `mode: full` experts,
routed-expert LoRA of another family. `check` validates an export against these rules, and runs on every
export before it is renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dsft import arch
from dsft.errors import DsftError
from dsft.moe.delta import expert_factors, lora_delta
from dsft.adapters.weights import Adapter

PREFIX = "base_model.model."
EXPERT_LORA_2D = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe")
WEIGHTS = "adapter_model.safetensors"


def refuse(adapter: Adapter, config: dict[str, Any]) -> None:
    kind = config.get("model_type")
    if adapter.replace:
        raise DsftError(f"--format vllm: the run trains {next(iter(adapter.replace)).removesuffix('.weight')} whole "
                        "(adapter.router: trainable), which vLLM cannot serve as LoRA; merge it instead (dsft merge)")
    if any(ex.full for ex in adapter.experts.values()):
        raise DsftError("--format vllm: the run trains whole experts (routed_experts.mode: full), which vLLM cannot "
                        "serve as LoRA; merge it instead (dsft merge)")
    if adapter.experts and kind not in EXPERT_LORA_2D:
        raise DsftError(f"--format vllm: vLLM has no per-expert LoRA for {kind} routed experts; merge the run "
                        f"instead, or train with routed_experts: none (served families: {', '.join(EXPERT_LORA_2D)})")


def vllm_tensors(adapter: Adapter, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors in vLLM's names with every module's scale folded into lora_B, the largest rank)."""
    tensors: dict[str, torch.Tensor] = {}
    ranks = []
    for key, (a, b, scale) in sorted(adapter.linear.items()):
        module = key.removesuffix(".weight")
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = (b.float() * scale).contiguous()
        ranks.append(a.shape[0])
    experts, inter, hidden = arch.num_experts(config), arch.expert_intermediate(config), config["hidden_size"]
    for module, ex in sorted(adapter.experts.items()):
        t = ex.tensors
        r = t["lora_gate_up_A"].shape[1]
        ranks.append(r)
        zeros = {"gate_up_A": torch.zeros(r, hidden), "gate_up_B": torch.zeros(2 * inter, r),
                 "down_A": torch.zeros(r, inter), "down_B": torch.zeros(hidden, r)}
        empty = {f"lora_{k}": [v] for k, v in zeros.items()}  # an expert without LoRA: zero factors
        for e in range(experts):
            stored, i = (t, ex.ids.index(e)) if e in ex.ids else (empty, 0)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                a, b = expert_factors(stored, i, proj)
                tensors[f"{PREFIX}{module}.{e}.{proj}.lora_A.weight"] = a.float().clone().contiguous()
                tensors[f"{PREFIX}{module}.{e}.{proj}.lora_B.weight"] = (b.float() * ex.scale).contiguous()
    return tensors, max(ranks, default=0)


def adapter_config(tensors: dict[str, torch.Tensor], rank: int, base: str) -> dict[str, Any]:
    leaves = sorted({k.removeprefix(PREFIX).split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    return {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": leaves,
            "lora_dropout": 0.0, "bias": "none", "modules_to_save": None, "base_model_name_or_path": base,
            "task_type": "CAUSAL_LM"}


def check(directory: Path, base: Path) -> list[str]:
    """What vLLM's loader would reject or mis-scale in an export for the checkpoint `base`: problems, one line each."""
    from safetensors import safe_open

    config = json.loads((base / "config.json").read_text())
    problems = []
    cfg = json.loads((directory / "adapter_config.json").read_text())
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            problems.append(f"adapter_config.json: {key} is set, and vLLM ignores it (one r and lora_alpha for all)")
    if cfg.get("modules_to_save"):
        problems.append("adapter_config.json: modules_to_save, which vLLM cannot load")
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
    bad = sorted(k for k in keys if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if bad:
        problems.append(f"{bad[0]}: vLLM reads only *.lora_A.weight / *.lora_B.weight")
    problems += [f"{k}: rank {shapes[k][0]} above r {cfg['r']}" for k in keys if k.endswith(".lora_A.weight")
                 and shapes[k][0] > cfg["r"]]
    layers: dict[str, set[tuple[int, str, str]]] = {}
    for k in keys:
        suffix = ".lora_A.weight" if k.endswith(".lora_A.weight") else ".lora_B.weight"
        m = arch.PER_EXPERT.match(k.removeprefix(PREFIX).removesuffix(suffix) + ".weight")
        if m:
            layers.setdefault(m.group("module"), set()).add((int(m.group("expert")), m.group("proj"), suffix))
    experts = arch.num_experts(config)
    for module, found in sorted(layers.items()):
        want = {(e, p, s) for e in range(experts) for p in ("gate_proj", "up_proj", "down_proj")
                for s in (".lora_A.weight", ".lora_B.weight")}
        if found != want:
            e, p, _ = sorted(want - found)[0] if want - found else sorted(found - want)[0]
            problems.append(f"{module}: expert {e} {p} is missing or extra; vLLM packs every expert of an adapted layer")
    return problems


def deltas(directory: Path) -> dict[str, torch.Tensor]:
    """Every weight change the export makes, by vLLM's rules: one scaling alpha / r (or / sqrt(r)) for all
    modules, delta = scaling * B A, per-expert keys as their own weights."""
    import math

    from safetensors.torch import load_file

    cfg = json.loads((directory / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(directory / WEIGHTS)
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            out[module + ".weight"] = lora_delta(a, tensors[key.replace(".lora_A.", ".lora_B.")], scaling)
    return out


def build(adapter: Adapter, config: dict[str, Any], base: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, adapter_config.json, facts for the export's record) for dsft.export.unmerged."""
    tensors, rank = vllm_tensors(adapter, config)
    return tensors, adapter_config(tensors, rank, base), {"max_lora_rank": rank}
