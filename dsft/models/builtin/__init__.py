"""Built-in tiny DeepSeek MoE models: the real transformers classes at toy sizes.

They are written once into a cache directory as an ordinary checkpoint (safetensors, config,
tokenizer) and then loaded through `from_pretrained`, so the demo exercises the same code path as a
real DeepSeek checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import dsft
from dsft.locks import exclusive
from dsft.outputs import cache_error, cache_root

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
PREFIX = "builtin:"  # model.path of a built-in model: builtin:NAME

_COMMON: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 1024,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-deepseek-v3": {
        **_COMMON,
        "model_type": "deepseek_v3",
        # routing keys as DeepSeek-V3 releases them: transformers ignores scoring_func and topk_method (it
        # always scores with a sigmoid and groups with noaux_tc), vLLM and llama.cpp read them
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "q_lora_rank": 48,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
    },
    "tiny-deepseek-v2": {
        **_COMMON,
        "model_type": "deepseek_v2",
        "q_lora_rank": None,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
    },
}
# Other transformers MoE families at the same size: grouped-query attention, 8 experts top-2. Qwen's layer 0
# is dense (`mlp_only_layers`) and Qwen2-MoE adds a gated shared expert; Mixtral's layers are all sparse
# and its checkpoint keeps the older `block_sparse_moe.experts.E.w1` names.
_GQA: dict[str, Any] = {
    key: _COMMON[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "max_position_embeddings", "bos_token_id", "eos_token_id",
                                  "pad_token_id", "tie_word_embeddings", "initializer_range", "num_experts_per_tok")
}
_GQA["num_key_value_heads"] = 2
_QWEN = {**_GQA, "moe_intermediate_size": 32, "num_experts": 8, "mlp_only_layers": [0], "norm_topk_prob": True}
CONFIGS.update({
    "tiny-qwen3-moe": {**_QWEN, "model_type": "qwen3_moe", "head_dim": 16},
    "tiny-qwen2-moe": {**_QWEN, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 32},
    "tiny-mixtral": {**_GQA, "model_type": "mixtral", "intermediate_size": 32, "num_local_experts": 8},
    # Dense DeepSeek models: DeepSeek LLM / Coder are Llama-layout (67B: grouped-query attention),
    # R1-Distill-Qwen is Qwen2 (q/k/v biases).
    "tiny-deepseek-llm": {**_GQA, "model_type": "llama", "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "tiny-r1-distill-qwen": {**_GQA, "model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
})
SEED = 0


def _fingerprint(name: str) -> str:
    h = hashlib.sha256(json.dumps(CONFIGS[name], sort_keys=True).encode())
    h.update(dsft.__version__.encode())
    for f in sorted(TOKENIZER_DIR.iterdir()):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def builtin_path(name: str) -> Path:
    """The checkpoint directory of built-in model `name`, materialised on first use."""
    if name not in CONFIGS:
        raise KeyError(name)
    root = cache_root()
    target = root / "builtin" / f"{name}-{_fingerprint(name)}"
    if not (target / "config.json").is_file():
        existing = next((p for p in (target.parent, *target.parent.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise cache_error(f"{existing} is a file, not a directory")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with exclusive(target.parent / f".{name}.lock"):  # ranks of `accelerate launch` start together
                if not (target / "config.json").is_file():
                    _materialise(name, target)
        except OSError as e:
            raise cache_error(f"cannot write {e.filename or target} ({e.strerror or e})") from None
    _check_entry(root, target)
    return target


def _check_entry(root: Path, target: Path) -> None:
    """A cached built-in model is whole: its config parses and its weights hold every byte their header names."""
    from dsft.models.files import safetensors_header

    try:
        json.loads((target / "config.json").read_text(encoding="utf-8"))
        safetensors_header(target / "model.safetensors")
    except (OSError, ValueError) as e:
        raise cache_error(f"the cached built-in model {target} is damaged ({str(e).split(';')[0][:160]})",
                           "delete that directory and dsft builds it again") from None


def _materialise(name: str, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    spec = dict(CONFIGS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():  # transformers writes only on rank 0 of a process group
            raise RuntimeError(f"built-in model {name}: resolve it before torch.distributed is initialised "
                               "(dsft does so in its preflight)")
        AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp)
        GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2).save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process materialised it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
