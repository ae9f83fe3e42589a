"""LoRA lands exactly on the recipe's module groups, and stays there after save -> reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsft.adapters.lora import attach_lora, load_lora, lora_modules, module_group
from dsft.config.schema import AdapterSection, ModelSection
from dsft.models.load import load_model, resolve_model_path


def _model(name: str = "tiny-deepseek-v3"):
    section = ModelSection(path=f"builtin:{name}", dtype="float32")
    return load_model(section, resolve_model_path(section.path))


def _groups(names: list[str]) -> set[str]:
    return {module_group(n) for n in names}


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-deepseek-v2"])
def test_placement_follows_recipe_and_survives_reload(name: str, tmp_path: Path) -> None:
    adapter = AdapterSection(r=4, alpha=8, dense_mlp=False, shared_experts={"r": 2})
    model, targets = attach_lora(_model(name), adapter)
    placed = lora_modules(model)
    assert _groups(placed) == {"attention", "shared_experts"}
    assert sorted(placed) == sorted(targets["attention"] + targets["shared_experts"])
    assert all(".mlp.experts" not in n for n in placed)
    experts = [p for n, p in model.named_parameters() if "mlp.experts." in n]
    assert experts and not any(p.requires_grad for p in experts)
    shared = dict(model.named_modules())[f"base_model.model.{targets['shared_experts'][0]}"]
    assert shared.lora_A["default"].weight.shape[0] == 2

    for p in model.parameters():  # make LoRA B non-zero so a lost weight would show
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora(_model(name), str(tmp_path / "adapter"))
    assert sorted(lora_modules(reloaded)) == sorted(placed)
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_stock_peft_would_move_shared_expert_lora(tmp_path: Path) -> None:
    """The trap dsft guards against: plain PEFT puts shared-expert targets on the routed experts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-deepseek-v3"))
    shared = [n for n, m in model.named_modules() if module_group(n) == "shared_experts" and isinstance(m, torch.nn.Linear)]
    stock = get_peft_model(model, LoraConfig(target_modules=shared))
    assert "shared_experts" not in _groups(lora_modules(stock))
    assert stock.peft_config["default"].target_parameters


def test_all_groups_off_is_a_recipe_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="enable at least one"):
        AdapterSection(attention=False, shared_experts=False, dense_mlp=False)
