"""Other transformers MoE families through the same path: Qwen3-MoE, Qwen2-MoE (gated shared expert) and
Mixtral (checkpoint in the older `block_sparse_moe.experts.E.w1` names): streaming load equal to
transformers', NF4 everywhere, LoRA exactly on the named groups, SFT, merge in the checkpoint's names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO
from dsft.config.schema import ModelSection
from dsft import arch
from dsft.models.load import load_model, resolve_model_path
from dsft.models.stream import shard_files
from dsft.moe.experts import DsftExperts

FAMILIES = ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral"]


def _keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for shard in shard_files(path):
        with safe_open(str(shard), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def test_moe_layer_rules_and_checkpoint_names() -> None:
    qwen = {"model_type": "qwen3_moe", "num_hidden_layers": 6, "num_experts": 8, "mlp_only_layers": [0],
            "decoder_sparse_step": 2}
    assert arch.moe_layers(qwen) == [1, 3, 5]
    deepseek = {"model_type": "deepseek_v3", "num_hidden_layers": 6, "n_routed_experts": 8, "first_k_dense_replace": 2}
    assert arch.moe_layers(deepseek) == [2, 3, 4, 5]
    assert arch.moe_layers({"model_type": "mixtral", "num_hidden_layers": 3, "num_local_experts": 8}) == [0, 1, 2]
    assert arch.moe_layers({"model_type": "qwen2_moe", "num_hidden_layers": 3, "num_experts": 0}) == []
    assert arch.canonical("model.layers.3.block_sparse_moe.experts.7.w3.weight") == "model.layers.3.mlp.experts.7.up_proj.weight"
    assert arch.canonical("model.layers.3.block_sparse_moe.experts.7.w2.weight") == "model.layers.3.mlp.experts.7.down_proj.weight"
    assert arch.canonical("model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.gate.weight"
    assert arch.canonical("model.layers.3.mlp.experts.7.up_proj.weight") == "model.layers.3.mlp.experts.7.up_proj.weight"


@pytest.mark.parametrize("name", FAMILIES)
def test_streaming_load_equals_transformers_and_nf4_covers_every_expert(name: str) -> None:
    import bitsandbytes as bnb

    path = resolve_model_path(f"builtin:{name}")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = load_model(ModelSection(path=f"builtin:{name}", dtype="float32"), path)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)

    nf4 = load_model(ModelSection(path=f"builtin:{name}", dtype="float32", quantization="nf4"), path)
    experts = [m for m in nf4.modules() if isinstance(m, DsftExperts)]
    assert len(experts) == len(arch.moe_layers(ref.config.to_dict())) and all(e.quantized for e in experts)
    full = sorted(n for n, m in nf4.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit))
    gates = [f"model.layers.{i}.mlp.shared_expert_gate" for i in (1, 2)] if name == "tiny-qwen2-moe" else []
    assert full == ["lm_head", *gates], full  # routers are parameters of `mlp.gate`, not Linear modules


def _expected_lora_modules(name: str) -> set[str]:
    """Attention in every layer; the dense MLP of Qwen's `mlp_only_layers` [0]; Qwen2-MoE's shared expert."""
    mlp = ("gate_proj", "up_proj", "down_proj")
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if name != "tiny-mixtral":
        expected |= {f"model.layers.0.mlp.{p}" for p in mlp}
    if name == "tiny-qwen2-moe":
        expected |= {f"model.layers.{i}.mlp.shared_expert.{p}" for i in (1, 2) for p in mlp}
    return expected


@pytest.mark.parametrize("name", FAMILIES)
def test_qlora_sft_and_merge_in_the_checkpoint_names(name: str, make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(model={"path": f"builtin:{name}", "quantization": "nf4"}, training={"max_steps": 6},
                         adapter={"routed_experts": {1: [0, 3]}})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "run/adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    lora = {k.removeprefix("base_model.model.").split(".lora_A")[0] for k in weights if ".lora_A." in k}
    assert lora == _expected_lora_modules(name)
    expert_keys = sorted(k for k in weights if ".mlp.experts." in k)
    assert expert_keys == [f"base_model.model.model.layers.1.mlp.experts.lora_{p}.weight" for p in
                           ("down_A", "down_B", "gate_up_A", "gate_up_B")]
    assert all(weights[k].abs().sum() > 0 for k in weights if "B." in k or "_B." in k)  # trained from zero
    meta = json.loads((adapter / "dsft_adapter.json").read_text())
    assert meta["routed_experts"]["experts"] == {"1": [0, 3]}

    result = cli("merge", "--adapter", tmp_path / "run", "--out", tmp_path / "merged", "--verify")
    assert result.exit_code == 0, result.output
    assert _keys(tmp_path / "merged") == _keys(resolve_model_path(f"builtin:{name}"))
    record = json.loads((tmp_path / "merged/dsft-merge.json").read_text())
    per_expert = 2 * 3  # experts 0 and 3 of layer 1: gate, up and down each
    assert record["touched_tensors"] == len(lora) + per_expert


def test_balance_loss_only_when_the_recipe_asks(make_recipe, cli, tmp_path: Path) -> None:
    """Qwen-MoE's config carries router_aux_loss_coef, which TRL would add by default: dsft adds its own
    balance loss when training.balance_loss asks, and no other."""
    plain = make_recipe("plain.yaml", model={"path": "builtin:tiny-qwen3-moe"}, training={"max_steps": 2, "logging_steps": 1},
                        output_dir=str(tmp_path / "plain"))
    balanced = make_recipe("balanced.yaml", model={"path": "builtin:tiny-qwen3-moe"},
                           adapter={"router": "trainable", "attention": False},
                           training={"balance_loss": True, "max_steps": 2, "logging_steps": 1},
                           output_dir=str(tmp_path / "balanced"))
    logs = {}
    for name, recipe in (("plain", plain), ("balanced", balanced)):
        result = cli("sft", "--recipe", recipe)
        assert result.exit_code == 0, result.output
        logs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert not any("aux_loss" in r or "balance_loss" in r for r in logs["plain"])
    assert any(r.get("balance_loss", 0) > 0 for r in logs["balanced"])
    assert not any("aux_loss" in r for r in logs["balanced"])


def test_dpo_on_an_nf4_qwen2_moe(make_recipe, cli, tmp_path: Path) -> None:
    """DPO with expert LoRA and the gated shared expert on an NF4 Qwen2-MoE: rewards separate, and the
    adapter holds exactly the planned parameters."""
    recipe = make_recipe("dpo.yaml", model={"path": "builtin:tiny-qwen2-moe", "quantization": "nf4"},
                         data={"train": str(REPO / "data_templates/legal/preference.jsonl"), "format": "preference",
                               "max_length": 160},
                         adapter={"routed_experts": {1: [0, 3]}}, dpo={"max_prompt_length": 64},
                         training={"lr": 5e-3, "max_steps": 16, "micro_batch_size": 8, "logging_steps": 4})
    result = cli("dpo", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    logs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    margins = [r["rewards/margins"] for r in logs if "rewards/margins" in r]
    assert margins[-1] > margins[0] + 0.3
    weights = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    assert any(".mlp.shared_expert." in k for k in weights) and not any(".ref." in k for k in weights)
    plan = json.loads((tmp_path / "run/plan.json").read_text())
    assert plan["trainable_params"] == sum(t.numel() for t in weights.values())
