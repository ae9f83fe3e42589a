"""`dsft sft` end to end on the built-in tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dsft.adapters.lora import load_lora
from dsft.config.schema import ModelSection
from dsft.models.load import load_model, resolve_model_path


def _base(name: str = "tiny-deepseek-v3"):
    section = ModelSection(path=f"builtin:{name}", dtype="float32")
    return load_model(section, resolve_model_path(section.path))


def test_sft_memorises_and_touches_only_lora(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(training={"max_steps": 40})
    base_before = {n: p.clone() for n, p in _base().state_dict().items()}
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"

    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                 "adapter/chat_template.jinja", "recipe.yaml", "run.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["base_model"]["model_type"] == "deepseek_v3"
    assert all(len(h) == 64 for h in info["data_sha256"].values())
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["training"]["max_steps"] == 40 and Path(saved["data"]["train"][0]).is_absolute()

    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] - 1.5, losses

    lora = load_file(run / "adapter/adapter_model.safetensors")
    assert lora and all(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)
    assert {k.split(".lora_")[0].split(".")[-1] for k in lora} >= {"q_a_proj", "kv_b_proj", "o_proj", "gate_proj", "down_proj"}

    base = _base()
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, base_before[name]), name
    model = load_lora(base, str(run / "adapter"))
    ids = torch.arange(2, 30).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, _base()(ids).logits)

    again = cli("sft", "--recipe", recipe)
    assert again.exit_code == 2 and "already holds a complete run; pass --force" in again.output


def test_every_lora_parameter_changes(make_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsft.config import load_recipe
    from dsft.train.sft import preflight, run_sft

    recipe = load_recipe(make_recipe(rows=8, training={"max_steps": 3}, adapter={"dropout": 0.0}))
    prepared = preflight(recipe, force=False)
    captured = {}
    import dsft.adapters.lora as lora_mod

    original = lora_mod.attach_lora

    def spy(model, adapter, selection):
        wrapped, targets = original(model, adapter, selection)
        captured.update({n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad})
        return wrapped, targets

    monkeypatch.setattr(lora_mod, "attach_lora", spy)
    run_sft(prepared, force=False)
    trained = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    assert len(trained) == len(captured)
    for name, before in captured.items():
        key = name.replace(".default", "")
        assert not torch.equal(trained[key], before), f"{name} did not change"


@pytest.mark.parametrize("fmt", ["prompt_completion", "alpaca"])
def test_other_formats_and_v2_model_train(fmt: str, make_recipe, cli, tmp_path: Path) -> None:
    from conftest import REPO

    data = REPO / f"data_templates/examples/{fmt}.jsonl"
    from safetensors.torch import load_file

    recipe = make_recipe(model={"path": "builtin:tiny-deepseek-v2"}, training={"max_steps": 8, "logging_steps": 1})
    result = cli("sft", "--recipe", recipe, "--set", f"data.train={data}", "--set", f"data.format={fmt}")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run/run.json").read_text())["summary"]
    assert summary["last_loss"] < summary["first_loss"] and summary["loss_tokens"] > 0  # the rows really trained
    weights = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    assert all(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k)  # every B moved off its zero init
