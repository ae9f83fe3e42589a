"""`dsft dpo`: rewards improve, the reference is the SFT model (expert LoRA included) and never moves."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

import pytest
import torch
from safetensors.torch import load_file
from trl import DPOTrainer

from conftest import REPO, write_jsonl
from dsft.adapters.lora import load_lora
from dsft.config import load_recipe
from dsft.config.schema import ModelSection
from dsft.models.load import load_model, resolve_model_path
from dsft.train import dpo as dpo_module
from dsft.train import pipeline

PAIRS = str(REPO / "data_templates/legal/preference.jsonl")


def _base(quantization: str = "none"):
    section = ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32", quantization=quantization)
    return load_model(section, resolve_model_path(section.path))


def _dpo_recipe(make_recipe, tmp_path: Path, **dpo) -> Path:
    return make_recipe("dpo.yaml", data={"train": PAIRS, "format": "preference", "max_length": 160},
                       dpo={"max_prompt_length": 64, **dpo}, output_dir=str(tmp_path / "dpo-run"),
                       training={"lr": 5e-3, "max_steps": 24, "micro_batch_size": 8, "logging_steps": 4})


@pytest.fixture
def sft_run(make_recipe, cli, tmp_path: Path) -> Path:
    recipe = make_recipe(adapter={"routed_experts": {1: [0, 3], 2: [5]}}, training={"max_steps": 6})
    assert cli("sft", "--recipe", recipe).exit_code == 0
    return tmp_path / "run"


def _capture(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Keep the DPOTrainer and the reference adapter's logits before and after training."""
    seen: dict = {}
    original = DPOTrainer.train
    ids = torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(0))

    def ref_logits(trainer: DPOTrainer) -> torch.Tensor:
        from trl.trainer.utils import use_adapter

        model = trainer.model
        with torch.no_grad(), use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return model(ids).logits.clone()

    def train(self, *args, **kwargs):
        seen["trainer"], seen["ref_before"] = self, ref_logits(self)
        result = original(self, *args, **kwargs)
        seen["ref_after"] = ref_logits(self)
        return result

    monkeypatch.setattr(DPOTrainer, "train", train)
    seen["ids"] = ids
    return seen


def _run(recipe: Path, force: bool = False):
    resolved = load_recipe(recipe, check_files=True)
    return pipeline.run(pipeline.preflight(resolved, dpo_module.OBJECTIVE, force), dpo_module.OBJECTIVE, force)


def test_rewards_improve_and_reference_stays_the_base(make_recipe, tmp_path: Path, monkeypatch, cli) -> None:
    seen = _capture(monkeypatch)
    result = _run(_dpo_recipe(make_recipe, tmp_path))
    assert result.last["rewards/accuracies"] > 0.8 >= result.first["rewards/accuracies"]
    assert result.last["rewards/margins"] > result.first["rewards/margins"] + 0.5
    torch.testing.assert_close(seen["ref_after"], seen["ref_before"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(seen["ref_before"], _base()(seen["ids"]).logits)  # fresh adapter: the base
    run = tmp_path / "dpo-run"
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert (run / "adapter/adapter_model.safetensors").is_file()
    assert not any(".ref." in k for k in load_file(run / "adapter/adapter_model.safetensors"))
    assert json.loads((run / "plan.json").read_text())["trainable_params"] == sum(
        t.numel() for t in load_file(run / "adapter/adapter_model.safetensors").values())

    from dsft.runs.metrics import read_metrics
    from dsft.train.curves import series

    drawn = series(read_metrics(run / "metrics.jsonl")[0], dpo_module.OBJECTIVE.panels)
    assert drawn["reward accuracy"]["train"][1][-1] == result.last["rewards/accuracies"]
    assert (run / "curves.png").is_file() and "reward margin (chosen - rejected)" in drawn
    assert "reward accuracy, first -> last logged step" in (run / "README.md").read_text()
    # a DPO run scored on SFT-format conversations, and on pairs (its own training pairs: --on-train says so)
    for data, rows, extra in (("eval.jsonl", "conversations", ()), ("preference.jsonl", "pairs", ("--on-train",))):
        scored = cli("eval", "--adapter", run, "--data", REPO / "data_templates/legal" / data, "--samples", 16,
                     "--generations", 0, *extra)
        assert scored.exit_code == 0, scored.output
        report = json.loads((run / "eval.json").read_text())
        assert report["rows"] == rows and report["data_kind"] == ("training data" if extra else "held-out")


def test_dpo_from_sft_uses_the_sft_model_as_reference(sft_run: Path, make_recipe, tmp_path: Path, monkeypatch) -> None:
    seen = _capture(monkeypatch)
    _run(_dpo_recipe(make_recipe, tmp_path, init_adapter=str(sft_run)))
    sft = load_lora(_base(), str(sft_run / "adapter"))
    with torch.no_grad():
        sft_logits = sft(seen["ids"]).logits
        base_logits = _base()(seen["ids"]).logits
    torch.testing.assert_close(seen["ref_before"], sft_logits)
    torch.testing.assert_close(seen["ref_after"], sft_logits)
    assert not torch.allclose(sft_logits, base_logits, atol=1e-3)
    layer = seen["trainer"].model.base_model.model.model.layers[1].mlp.experts
    ref, default = layer.lora_down_B["ref"].weight, layer.lora_down_B["default"].weight
    torch.testing.assert_close(ref, sft.base_model.model.model.layers[1].mlp.experts.lora_down_B["default"].weight)
    assert not ref.requires_grad and default.requires_grad and not torch.equal(ref, default)
    trained = load_file(tmp_path / "dpo-run/adapter/adapter_model.safetensors")
    assert trained.keys() == load_file(sft_run / "adapter/adapter_model.safetensors").keys()
    # the model card describes the adapter as trained: the SFT run's groups and experts, continued
    card = (tmp_path / "dpo-run/README.md").read_text()
    experts = json.loads((sft_run / "adapter/dsft_adapter.json").read_text())["routed_experts"]["experts"]
    assert "as in the adapter this run continued" in card and f"continues `{sft_run}`" in card
    for layer, ids in experts.items():
        assert f"- layer {layer}: experts {', '.join(map(str, ids))}" in card


def test_nf4_base_with_expert_lora_trains_only_the_adapter(make_recipe, tmp_path: Path, monkeypatch) -> None:
    seen = _capture(monkeypatch)
    recipe = _dpo_recipe(make_recipe, tmp_path)
    text = recipe.read_text().replace("dtype: float32", "dtype: float32\n  quantization: nf4")
    recipe.write_text(text)
    before = {}

    original = DPOTrainer.__init__

    def init(self, *args, **kwargs):
        model = kwargs["model"]
        before.update({n: t.clone() for n, t in (*model.named_parameters(), *model.named_buffers())})
        original(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "__init__", init)
    resolved = load_recipe(recipe, ["adapter.routed_experts={1: [0, 3]}", "training.max_steps=3"], check_files=True)
    pipeline.run(pipeline.preflight(resolved, dpo_module.OBJECTIVE, False), dpo_module.OBJECTIVE, False)
    model = seen["trainer"].model
    changed = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if n in before and not torch.equal(t, before[n])]
    assert changed and all(".default" in n and "lora_" in n for n in changed), changed
    assert any("mlp.experts.lora_" in n for n in changed)


def test_bad_preference_rows(tmp_path: Path, make_recipe, cli) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "Q?", "chosen": "A.", "rejected": "B."},
        {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "Q?", "chosen": "A."},
        {"prompt": "", "chosen": "A.", "rejected": "B."},
        {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "user", "content": "A."}], "rejected": "B."},
        "{oops",
    ])
    recipe = _dpo_recipe(make_recipe, tmp_path)
    result = cli("dpo", "--recipe", recipe, "--set", f"data.train={bad}")
    assert result.exit_code == 2
    for line, message in ((2, "chosen and rejected are identical"), (3, "missing field 'rejected'"),
                          (4, "missing field 'prompt'"), (5, "field 'chosen': messages must have role 'assistant'"), (6, "not valid JSON")):
        assert f"{bad}:{line}: {message}" in result.output, result.output
    assert not (tmp_path / "dpo-run").exists()
    sft_data = cli("dpo", "--recipe", recipe, "--set", "data.format=messages")
    assert sft_data.exit_code == 2 and "data.format: `dsft dpo` trains on preference rows" in sft_data.output


def test_long_prompts_truncated_or_dropped() -> None:
    from dsft.data.preference import load_pairs, tokenize_answers
    from dsft.models.load import load_tokenizer

    tokenizer = load_tokenizer(REPO / "dsft/models/builtin/tokenizer")
    pairs = load_pairs([PAIRS])[:10]
    long = [{**p, "prompt": [{"role": "user", "content": "Background facts. " * 40 + p["prompt"][-1]["content"]}]}
            for p in pairs]
    cut = tokenize_answers(tokenizer, long, ("chosen", "rejected"), 40, "truncate")
    offsets, values = cut["prompt_ids"]
    prompts = [tokenizer.decode(values[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    assert cut["truncated"] == 10 and cut["dropped"] == 0 and (cut["prompt_length"] <= 40).all()
    assert all(p["prompt"][-1]["content"][-10:] in text for text, p in zip(prompts, pairs))  # the end is kept
    dropped = tokenize_answers(tokenizer, long + pairs, ("chosen", "rejected"), 40, "drop")
    assert dropped["dropped"] == 10 and len(dropped["prompt_length"]) == 10 and dropped["rows"] == 20


def test_eval_implicit_reward_agrees_with_training_and_against_compares_runs(sft_run: Path, cli, tmp_path: Path) -> None:
    """On the training pairs, eval's implicit-reward accuracy (against the SFT adapter the DPO run continued)
    is the trainer's reward accuracy: equal to the last logged one within what one more logging window of
    training moves it; --against scores the SFT run on the same rows beside it."""
    rows = (REPO / "data_templates/legal/preference.jsonl").read_text().splitlines()
    pairs, held = write_jsonl(tmp_path / "pairs.jsonl", rows[:90]), write_jsonl(tmp_path / "held.jsonl", rows[90:])
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": "builtin:tiny-deepseek-v3", "dtype": "float32"},
        "data": {"train": str(pairs), "eval": str(held), "format": "preference", "max_length": 256},
        "adapter": {"dropout": 0.0},
        "dpo": {"init_adapter": str(sft_run), "beta": 0.1, "max_prompt_length": 128},
        "training": {"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0, "max_steps": 24, "micro_batch_size": 8,
                     "logging_steps": 1, "save_steps": 1000, "eval_steps": 24},
        "output_dir": str(tmp_path / "dpo")}))
    result = cli("dpo", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (tmp_path / "dpo/metrics.jsonl").read_text().splitlines()]
    accuracies = [r["rewards/accuracies"] for r in logged if "rewards/accuracies" in r]
    held_out = [r for r in logged if "eval_rewards/accuracies" in r][-1]  # TRL's eval after the last step
    result = cli("eval", "--adapter", tmp_path / "dpo", "--generations", 0)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "dpo/eval.json").read_text())
    assert report["examples"] == 24  # the same 24 held-out pairs (3 whole eval batches), the same final adapter, no dropout: equal
    assert report["implicit_reward"]["accuracy"] == pytest.approx(held_out["eval_rewards/accuracies"], abs=1e-6)
    assert report["implicit_reward"]["margin"] == pytest.approx(held_out["eval_rewards/margins"], rel=1e-3, abs=1e-4)
    sft_files = {p.name: p.read_bytes() for p in sft_run.iterdir() if p.is_file()}
    result = cli("eval", "--adapter", tmp_path / "dpo", "--on-train", "--generations", 1, "--max-new-tokens", 3,
                 "--against", sft_run)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in sft_run.iterdir() if p.is_file()} == sft_files  # nothing written there
    comparison = json.loads((tmp_path / "dpo/comparison.json").read_text())
    assert (tmp_path / "dpo/comparison.png").read_bytes()[:4] == b"\x89PNG"
    report, against = (comparison["reports"][name] for name in comparison["runs"])
    implicit = report["implicit_reward"]
    assert implicit["reference"] == f"the adapter it continued ({sft_run / 'adapter'})" and implicit["beta"] == 0.1
    assert implicit["accuracy"] > 0.6 and implicit["margin"] > 0
    # the trainer's last epoch of logged batches (8 pairs each, measured before their own step) against every
    # training pair after the last step: the same measure, so close; the held-out check above is the exact one
    last_epoch = accuracies[-11:]
    assert abs(implicit["accuracy"] - sum(last_epoch) / len(last_epoch)) <= 0.2, (implicit, last_epoch)
    assert against["data"] == report["data"] and against["examples"] == report["examples"]
    assert against["implicit_reward"]["reference"] == "the base"
    # the DPO run's training pairs are training data for it, and held-out for the SFT run, which never saw them
    assert report["data_kind"] == "training data" and against["data_kind"] == "held-out"
    assert against["data_source"] == f"data.train (--on-train) of {tmp_path / 'dpo'}"
    assert len(comparison["answers"]) == 1 and set(comparison["answers"][0]) == {"prompt", "reference", *comparison["runs"]}
    text = result.output.replace("\n", " ")
    assert str(sft_run) in text and "implicit reward acc" in text and "held-out for sft" in text.replace(sft_run.name, "sft")
    assert "tokens from cache" not in text or "--data:" not in text


def test_ipo_is_dpos_loss_type(make_recipe, tmp_path: Path) -> None:
    """IPO has no command of its own (docs/objectives.md): `dpo.loss_type: ipo` reaches TRL's DPOConfig, with beta
    as IPO's regularisation strength."""
    from dsft.train import objective as plugins
    from dsft.train import settings

    recipe = load_recipe(_dpo_recipe(make_recipe, tmp_path, loss_type="ipo", beta=0.3))
    config = settings.trl_config(plugins.objective("dpo"), recipe, None, tmp_path / "run", torch.float32)
    assert config.loss_type == ["ipo"]  # TRL keeps its losses as a list (several may be combined)
    assert config.beta == pytest.approx(0.3)
