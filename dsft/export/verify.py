"""`dsft merge --verify`: the merged checkpoint against the unquantized base + adapter.

Compares logits on a few prompts from the run's data and every token's top-k expert set, checks that
every adapted expert's weights changed in the merged files, and, for runs trained on NF4, reports as
information the gap between the adapter on the NF4 base and the merged model (the quantization error).
`layers` limits both models to their first layers for checkpoints too big to load twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsft.export.merge import Source
from dsft.export.safetensors_io import read_header, read_tensor
from dsft.models.arch import canonical
from dsft.models.stream import shard_files
from dsft.moe.routing import routers

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _prompts(source: Source, tokenizer: Any, count: int, max_tokens: int = 128) -> list[torch.Tensor]:
    from dsft.data.formats import load_conversations

    data = (source.recipe or {}).get("data", {})
    files = [f for f in (data.get("eval") or data.get("train") or []) if Path(f).is_file()]
    if files:
        rows = load_conversations(files, data.get("format", "messages"))[:count]
        texts = [tokenizer.apply_chat_template(r, tokenize=False) for r in rows]
    else:
        texts = ["The contract was signed by both parties and", "Explain the rule in one sentence:"][:count]
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens]).unsqueeze(0) for t in texts]


def _run(model: torch.nn.Module, prompts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[int, torch.Tensor]]]:
    from dsft.models.load import autocast_for

    device = next(model.parameters()).device
    logits, routes = [], []
    for ids in prompts:
        seen: dict[int, torch.Tensor] = {}
        hooks = [r.register_forward_hook(lambda m, a, o, layer=layer: seen.__setitem__(layer, o[2].sort(-1).values))
                 for layer, r in routers(model).items()]
        with torch.no_grad(), autocast_for(model):
            logits.append(model(ids.to(device)).logits.float().cpu())
        for h in hooks:
            h.remove()
        routes.append({k: v.cpu() for k, v in seen.items()})
    return logits, routes


def _compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    diff = torch.cat([(x - y).abs().flatten() for x, y in zip(a, b)])
    scale = max(float(torch.cat([x.abs().flatten() for x in a]).max()), 1e-6)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "rel": float(diff.max()) / scale}


def _same_experts(a: list[dict[int, torch.Tensor]], b: list[dict[int, torch.Tensor]]) -> float:
    same = total = 0
    for ra, rb in zip(a, b):
        for layer in ra:
            same += int((ra[layer] == rb[layer]).all(-1).sum())
            total += ra[layer].shape[0]
    return same / max(total, 1)


def expert_changes(source: Source, out: Path, routed: dict[str, Any] | None) -> list[str]:
    """Adapted experts whose merged weights equal the base's (a merge that dropped them)."""
    if not routed:
        return []
    base_tensors, out_tensors = _tensor_index(source.base), _tensor_index(out)
    unchanged = []
    for layer, ids in routed["experts"].items():
        prefix = f"model.layers.{layer}.mlp.experts"
        for e in ids:
            keys = [f"{prefix}.{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
            if keys[0] in base_tensors:
                parts = [(_load(base_tensors, k), _load(out_tensors, k)) for k in keys]
            else:
                parts = [(_load(base_tensors, f"{prefix}.{p}")[e], _load(out_tensors, f"{prefix}.{p}")[e])
                         for p in ("gate_up_proj", "down_proj")]
            if all(torch.equal(x, y) for x, y in parts):
                unchanged.append(f"layer {layer} expert {e}")
    return unchanged


def _tensor_index(path: Path) -> dict[str, tuple[Path, dict[str, Any], int]]:
    index = {}
    for shard in shard_files(path):
        header, start = read_header(shard)
        index.update({canonical(k): (shard, v, start) for k, v in header.items() if k != "__metadata__"})
    return index


def _load(index: dict[str, tuple[Path, dict[str, Any], int]], key: str) -> torch.Tensor:
    shard, entry, start = index[key]
    with shard.open("rb") as f:
        return read_tensor(f, entry, start)


def verify(source: Source, out: Path, record: dict[str, Any], layers: int | None = None, prompts: int = 4) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from dsft.adapters.lora import load_lora
    from dsft.config.schema import ModelSection
    from dsft.models.load import device, load_model, load_tokenizer, resolve_dtype
    from dsft.models.stream import load_streaming

    recipe_model = (source.recipe or {}).get("model", {})
    dtype = resolve_dtype(recipe_model.get("dtype", "auto"))
    section = ModelSection(path=str(source.base), dtype={torch.float32: "float32", torch.bfloat16: "bfloat16",
                                                         torch.float16: "float16"}[dtype])
    load_base = (lambda q: load_streaming(source.base, dtype, q, device(), num_layers=layers)) if layers else \
        (lambda q: load_model(section.model_copy(update={"quantization": "nf4" if q else "none"}), source.base))
    tokenizer = load_tokenizer(out)
    inputs = _prompts(source, tokenizer, prompts)
    adapter_logits, adapter_routes = _run(load_lora(load_base(False), str(source.adapter_dir)), inputs)
    extra = {"num_hidden_layers": layers} if layers else {}
    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, trust_remote_code=False, **extra).to(device())
    merged_logits, merged_routes = _run(merged_model, inputs)
    del merged_model
    report = {"dtype": str(dtype).removeprefix("torch."), "prompts": len(inputs), "layers": layers or "all",
              **_compare(adapter_logits, merged_logits), "same_expert_sets": _same_experts(adapter_routes, merged_routes),
              "tolerance_rel": TOLERANCE[dtype], "unchanged_experts": expert_changes(source, out, record.get("routed_experts"))}
    if recipe_model.get("quantization") == "nf4":
        nf4_logits, _ = _run(load_lora(load_base(True), str(source.adapter_dir)), inputs)
        report["nf4_adapter_vs_merged"] = _compare(nf4_logits, merged_logits)
    report["ok"] = report["rel"] <= report["tolerance_rel"] and not report["unchanged_experts"]
    return report
