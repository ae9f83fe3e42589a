"""What differs between the MoE families dsft trains, read from config.json alone (no torch).

All of them run routed experts as transformers' fused `mlp.experts` (gate_up_proj [E, 2I, H], down_proj
[E, H, I]) behind a top-k router at `mlp.gate`; they differ in which layers are sparse, the attention
projections (DeepSeek's MLA or grouped-query q/k/v/o), the shared experts (DeepSeek's
`mlp.shared_experts`, Qwen2-MoE's gated `mlp.shared_expert`, none) and the expert width's config key.
Mixtral checkpoints keep the older `block_sparse_moe.experts.E.w1/w3/w2` names; `canonical` maps a
checkpoint key to the model's name for it (merge writes the checkpoint's own names back).
"""

from __future__ import annotations

import re
from typing import Any

SUPPORTED = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "llama", "qwen2")
DENSE = ("llama", "qwen2")  # DeepSeek LLM 7B/67B and Coder (Llama layout), R1-Distill-Llama / -Qwen
QWEN = ("qwen2_moe", "qwen3_moe")
IDENTITY = ("model_type", "hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts", "num_local_experts",
            "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace", "vocab_size")

_LEGACY = [(re.compile(rf"\.block_sparse_moe\.experts\.(\d+)\.{w}\.weight$"), rf".mlp.experts.\1.{proj}.weight")
           for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))]
_LEGACY.append((re.compile(r"\.block_sparse_moe\.gate\.weight$"), ".mlp.gate.weight"))


LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
PER_EXPERT = re.compile(r"^(?P<module>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
FUSED = re.compile(r"^(?P<module>.+\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def layer_index(name: str) -> int | None:
    """The decoder layer of a module or tensor name (`model.layers.3.mlp.experts` -> 3), None outside layers."""
    m = LAYER.search(name + ".")
    return int(m.group(1)) if m else None


def experts_module(layer: int) -> str:
    """The routed-experts module of a decoder layer, in the model's names."""
    return f"model.layers.{layer}.mlp.experts"


def expert_key(key: str) -> re.Match | None:
    """A routed-expert checkpoint tensor in the model's names: per-expert (`module`, `expert`, `proj`) or
    fused (`module`, `proj`: gate_up_proj / down_proj); None for any other tensor."""
    return PER_EXPERT.match(key) or FUSED.match(key)


def selects(key: str, names: set[str] | dict, experts: dict[str, list[int]]) -> bool:
    """Whether checkpoint tensor `key` is one of `names` (model names) or belongs to a selected routed
    expert (`experts`: experts module -> ids; a fused tensor belongs to every expert of its module)."""
    key = canonical(key)
    if key in names:
        return True
    m = expert_key(key)
    if not m or m.group("module") not in experts:
        return False
    return "expert" not in m.groupdict() or int(m.group("expert")) in experts[m.group("module")]


def canonical(key: str) -> str:
    """The model's name for a checkpoint tensor (Mixtral's `block_sparse_moe.*` names; others unchanged)."""
    if ".block_sparse_moe." not in key:
        return key
    for pattern, repl in _LEGACY:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def num_experts(cfg: dict[str, Any]) -> int:
    return int(cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0)


def moe_layers(cfg: dict[str, Any]) -> list[int]:
    """Indices of the layers whose MLP is routed experts, by each family's rule."""
    layers = cfg["num_hidden_layers"]
    if not num_experts(cfg):
        return []
    if cfg.get("model_type") in QWEN:
        dense = set(cfg.get("mlp_only_layers") or [])
        step = cfg.get("decoder_sparse_step", 1) or 1
        return [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
    first_dense = cfg.get("first_k_dense_replace", 0) or 0
    step = cfg.get("moe_layer_freq", 1) or 1
    return [i for i in range(first_dense, layers) if (i - first_dense) % step == 0]


def expert_intermediate(cfg: dict[str, Any]) -> int:
    """One routed expert's intermediate width (Mixtral's experts use `intermediate_size`)."""
    return int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])


def shared_intermediate(cfg: dict[str, Any]) -> int:
    """The shared expert MLP's intermediate width per MoE layer; 0 without one."""
    if cfg.get("model_type") == "qwen2_moe":
        return int(cfg.get("shared_expert_intermediate_size") or 0)
    return int((cfg.get("moe_intermediate_size") or 0) * (cfg.get("n_shared_experts") or 0))


def is_mla(cfg: dict[str, Any]) -> bool:
    return cfg.get("kv_lora_rank") is not None


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def attention_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each attention projection of one layer."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if not is_mla(cfg):
        d, kv = head_dim(cfg), cfg.get("num_key_value_heads") or heads
        return {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h)}
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    attn = {"kv_a_proj_with_mqa": (h, cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]),
            "kv_b_proj": (cfg["kv_lora_rank"], heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"])),
            "o_proj": (heads * cfg["v_head_dim"], h)}
    if cfg.get("q_lora_rank"):
        attn.update(q_a_proj=(h, cfg["q_lora_rank"]), q_b_proj=(cfg["q_lora_rank"], heads * qk))
    else:
        attn.update(q_proj=(h, heads * qk))
    return attn


def attention_width(cfg: dict[str, Any]) -> int:
    """Per-token attention activations kept for backward, summed over heads (memory estimates)."""
    heads = cfg["num_attention_heads"]
    if not is_mla(cfg):
        return heads * 2 * 2 * head_dim(cfg)
    return heads * 2 * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"])


def missing_config_keys(cfg: dict[str, Any]) -> list[str]:
    """Keys dsft and transformers read for this architecture that config.json lacks (transformers would
    fill them with its defaults, building another model than the checkpoint's)."""
    keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    if cfg.get("model_type") in DENSE:
        keys.append("intermediate_size")
    if num_experts(cfg):
        keys.append("moe_intermediate_size" if cfg.get("model_type") in ("deepseek_v2", "deepseek_v3", *QWEN)
                    else "intermediate_size")
    if is_mla(cfg):
        keys += ["qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
    return [k for k in keys if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool)]


# Config keys inference engines read for each architecture that transformers' own classes may leave out
# (transformers ignores DeepSeek's `topk_method` / `scoring_func`; vLLM routes by them and looks up
# `e_score_correction_bias` only under `noaux_tc`; llama.cpp's converter writes them into the GGUF and
# routes with softmax without them). A merged config.json missing one is reported (docs/merge.md).
ENGINE_KEYS: dict[str, tuple[str, ...]] = {
    "deepseek_v2": ("topk_method", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
                    "first_k_dense_replace", "routed_scaling_factor", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim"),
    "deepseek_v3": ("topk_method", "scoring_func", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
                    "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
                    "first_k_dense_replace", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim"),
    "qwen2_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "norm_topk_prob"),
    "qwen3_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"),
    "mixtral": ("num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "llama": ("num_key_value_heads", "intermediate_size", "rms_norm_eps", "rope_theta"),
    "qwen2": ("num_key_value_heads", "intermediate_size", "rms_norm_eps", "rope_theta"),
}


def missing_engine_keys(cfg: dict[str, Any]) -> list[str]:
    """ENGINE_KEYS of the config's architecture that it lacks."""
    return [k for k in ENGINE_KEYS.get(cfg.get("model_type", ""), ()) if k not in cfg]
