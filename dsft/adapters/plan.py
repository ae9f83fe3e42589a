"""The targeting plan: every adapted module and expert, parameter counts, adapter size, what is held
in NF4 and what in full precision, and an estimate of peak GPU memory. Computed from config.json and
the recipe alone (no model load), checked against the live adapter by `dsft sft`, saved as plan.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsft.adapters.selection import moe_layout
from dsft.config.schema import Recipe
from dsft import arch

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit block scales, fp32 scale per 256 blocks
ADAM_BYTES = 16  # fp32 master + grad + two Adam moments


def module_shapes(cfg: dict[str, Any]) -> dict[str, dict[str, tuple[int, int]]]:
    """(in, out) of the linear layers of each group, per layer."""
    h = cfg["hidden_size"]
    mlp = lambda i: {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # noqa: E731
    shared = arch.shared_intermediate(cfg)
    return {"attention": arch.attention_shapes(cfg), "shared_experts": mlp(shared) if shared else {},
            "dense_mlp": mlp(cfg["intermediate_size"])}


def _lora(shape: tuple[int, int], r: int) -> int:
    return r * (shape[0] + shape[1])


def build_plan(recipe: Recipe, cfg: dict[str, Any], selection: dict[int, list[int] | None],
               processes: int = 1) -> dict[str, Any]:
    adapter = recipe.adapter
    moe_layers, num_experts = moe_layout(cfg)
    dense_layers = [i for i in range(cfg["num_hidden_layers"]) if i not in moe_layers]
    shapes = module_shapes(cfg)
    groups: dict[str, Any] = {}
    for group, layers in (("attention", range(cfg["num_hidden_layers"])), ("shared_experts", moe_layers),
                          ("dense_mlp", dense_layers)):
        spec = getattr(adapter, group)
        if not spec.enabled or not shapes[group] or not layers:
            continue
        r, alpha = adapter.rank_alpha(group)
        per_layer = sum(_lora(s, r) for s in shapes[group].values())
        groups[group] = {"r": r, "alpha": alpha, "modules": len(shapes[group]) * len(layers),
                         "layers": list(layers), "params": per_layer * len(layers)}
    h, inter = cfg["hidden_size"], arch.expert_intermediate(cfg)
    routed = adapter.routed_experts
    if selection:
        r, alpha = adapter.rank_alpha("routed_experts")
        per_expert = 3 * h * inter if routed.mode == "full" else r * (h + 2 * inter) + r * (inter + h)
        experts = {str(layer): ids if ids is not None else list(range(num_experts)) for layer, ids in selection.items()}
        groups["routed_experts"] = {"r": r, "alpha": alpha, "mode": routed.mode,
                                    "experts": experts, "params": per_expert * sum(len(v) for v in experts.values()),
                                    "selected": f"{sum(len(v) for v in experts.values())} experts (of {num_experts} per "
                                                f"layer, {len(moe_layers)} MoE layers)"}
    if adapter.router == "trainable":
        groups["router"] = {"modules": len(moe_layers), "params": num_experts * h * len(moe_layers)}
    trainable = sum(g["params"] for g in groups.values())
    return {"groups": groups, "trainable_params": trainable, "adapter_bytes": 4 * trainable,
            "weights": weight_bytes(recipe, cfg, moe_layers, num_experts),
            "memory": memory_estimate(recipe, cfg, trainable, processes)}


def compute_bytes(recipe: Recipe) -> int:
    """Bytes per weight held in the compute dtype (`auto` counts as bfloat16, as on a GPU)."""
    return 4 if recipe.model.dtype == "float32" else 2


def weight_bytes(recipe: Recipe, cfg: dict[str, Any], moe_layers: list[int], num_experts: int) -> dict[str, Any]:
    """How the frozen base is held: NF4 (every Linear but the router and lm_head, every routed expert)
    or the compute dtype, in bytes."""
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    shapes = module_shapes(cfg)
    dense_layers = cfg["num_hidden_layers"] - len(moe_layers)
    linear = sum(a * b for a, b in shapes["attention"].values()) * cfg["num_hidden_layers"]
    linear += sum(a * b for a, b in shapes["shared_experts"].values()) * len(moe_layers)
    linear += sum(a * b for a, b in shapes["dense_mlp"].values()) * dense_layers
    experts = 3 * h * arch.expert_intermediate(cfg) * num_experts * len(moe_layers)
    full = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + num_experts * h * len(moe_layers)
    half = compute_bytes(recipe)
    if recipe.model.quantization == "nf4":
        return {"nf4_params": linear + experts, "full_precision_params": full, "expert_params": experts,
                "bytes": int((linear + experts) * NF4_BYTES + full * half)}
    return {"nf4_params": 0, "full_precision_params": linear + experts + full, "bytes": (linear + experts + full) * half}


CUDA_CONTEXT_GIB = 1.0  # the CUDA context and allocator slack on a GPU
HOST_PROCESS_GIB = 0.6  # a CPU run's Python process beside the model: torch, transformers, TRL (peak RSS 0.60 GiB
                        # measured for `dsft sft --recipe recipes/tiny-legal.yaml`, run.json summary.peak_host_gib)


def memory_estimate(recipe: Recipe, cfg: dict[str, Any], trainable: int, processes: int = 1) -> dict[str, float]:
    """Peak GPU memory per GPU, estimated: weights + 16 B per trainable parameter + activations. With
    activation checkpointing a token keeps each layer's input and, for the layer being recomputed,
    its attention and top-k expert activations; without it, those of every layer. NF4 experts add one
    layer's dequantized experts (a reused buffer). Under training.parallel on N processes each GPU holds 1/ep of
    the routed experts (their codes, dequantized layer, LoRA and AdamW state: the adapter's state is counted at 1/ep
    of it all) and 1/N of the rest, read as its FSDP2 shard (dsft.models.shards; a routing `policy` profiles on a
    companion holding the same shards); without training.parallel the whole model."""
    gib = 2**30
    h, layers, k = cfg["hidden_size"], cfg["num_hidden_layers"], cfg.get("num_experts_per_tok") or 0
    inter, attn = arch.expert_intermediate(cfg), arch.attention_width(cfg)
    layer_tokens = 1.2 * 2 * (k * (2 * h + 3 * inter) + attn)
    per_token = 2 * h * layers + layer_tokens if recipe.training.activation_checkpointing else layer_tokens * layers
    tokens = recipe.training.micro_batch_size * recipe.data.max_length
    moe_layers, num_experts = moe_layout(cfg)
    nf4 = recipe.model.quantization == "nf4"
    expert_params = 3 * h * arch.expert_intermediate(cfg) * num_experts * len(moe_layers)
    expert_bytes = expert_params * (NF4_BYTES if nf4 else compute_bytes(recipe))
    other = weight_bytes(recipe, cfg, moe_layers, num_experts)["bytes"] - expert_bytes
    parallel = recipe.training.parallel
    ep, shards = (parallel.ep, max(processes, 1)) if parallel is not None else (1, 1)
    weights = expert_bytes / ep + other / shards
    if nf4 and moe_layers:
        weights += expert_params / len(moe_layers) / ep * compute_bytes(recipe)
    adapter = ADAM_BYTES * trainable / ep
    total = weights + adapter + per_token * tokens
    return {"weights_gib": weights / gib, "adapter_training_gib": adapter / gib,
            "activations_gib": per_token * tokens / gib, "peak_gib": total / gib + CUDA_CONTEXT_GIB,
            "host_gib": total / gib + HOST_PROCESS_GIB, "tokens_per_micro_batch": tokens}


def plan_table(plan: dict[str, Any], measured_peak_gib: float | None = None, cuda: bool | None = None):
    """The plan as a table; memory is the GPU's peak with CUDA (`cuda` None: this machine's), else the
    host's (a CPU run)."""
    from rich.table import Table

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    table = Table(title="dsft targeting plan")
    for col in ("group", "what", "trainable params"):
        table.add_column(col, justify="right" if col == "trainable params" else "left")
    for group, g in plan["groups"].items():
        if group == "routed_experts":
            kind = "full weights" if g["mode"] == "full" else f"lora r={g['r']}"
            what = f"{kind}, {g['selected']}: " + "; ".join(
                f"L{layer}: {len(ids)} {ids}" for layer, ids in g["experts"].items())
        elif group == "router":
            what = f"{g['modules']} routers (full weights)"
        else:
            what = f"r={g['r']}, {g['modules']} modules in layers {g['layers'][0]}..{g['layers'][-1]}"
        table.add_row(group, what, f"{g['params']:,}")
    w, m = plan["weights"], plan["memory"]
    table.add_row("total", f"adapter {plan['adapter_bytes'] / 2**20:.1f} MiB on disk (fp32)", f"{plan['trainable_params']:,}")
    table.add_row("base weights", f"{w['nf4_params']:,} params NF4, {w['full_precision_params']:,} full precision", "")
    estimate = m["peak_gib"] if cuda or "host_gib" not in m else m["host_gib"]
    peak = f"~{estimate:.1f} GiB estimated for {m['tokens_per_micro_batch']} tokens per micro-batch"
    if measured_peak_gib is not None:
        peak += f" (measured {measured_peak_gib:.1f} GiB)"
    table.add_row("peak GPU memory" if cuda else "peak host memory (CPU run)", peak, "")
    for split, d in (plan.get("data") or {}).items():
        cache = ", ".join(d["cache"]) if isinstance(d["cache"], list) else d["cache"]
        table.add_row(split, f"{d['rows']:,} rows, {d['tokens']:,} tokens, prepared in {cache}", "")
        for m in d.get("mix") or []:
            how = f"weight {m['weight']:g}" if "weight" in m else f"rows {m['rows']:,}" if "rows" in m else "whole"
            table.add_row("", f"  {Path(m['path']).name}: {m['rows_used']:,} rows ({m['share']:.0%}; {how}, "
                          f"{m['rows_in_file']:,} in the file, {m.get('format', '')})", "")
    profile = plan.get("profile")
    if profile:
        table.add_row("routing profile", f"{profile['rows']:,} rows sampled ({profile['unique_rows']:,} distinct in "
                      f"data.train), {profile['tokens_counted']:,} tokens, {profile['seconds']:.1f} s"
                      + (" (cached)" if profile.get("cached") else ""), "")
    return table
