"""The objectives as plug-ins: KTO, ORPO and SimPO each raise their own preference metric on pairs they did
not train on; under all five objectives only the chosen experts' LoRA trains and the router stays frozen;
an objective with its own section, data format, TRL config and trainer plugs in from tests/ without a
change under dsft/."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, legal_rows, write_jsonl

PAIRS = REPO / "data_templates/legal/preference.jsonl"
PROMPTS = REPO / "data_templates/legal/prompts.jsonl"
HEDGE = "depends on many things"  # the rejected answer's pattern the held-out pairs share with training pairs


def _split(tmp: Path) -> tuple[Path, Path]:
    """Training pairs, and 10 held-out pairs: the last ones whose rejected answer hedges instead of answering
    (the preference a model can learn from the other pairs; a rejected answer about another topic needs
    knowledge of the law a random tiny model does not have)."""
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    text = lambda answer: answer if isinstance(answer, str) else answer[-1]["content"]  # noqa: E731
    held = [r for r in rows if HEDGE in text(r["rejected"])][-10:]
    return write_jsonl(tmp / "train-pairs.jsonl", [r for r in rows if r not in held]), write_jsonl(tmp / "held.jsonl", held)


def _scores(run: Path, held: Path) -> dict[str, dict[str, float]]:
    """Base and adapter on the held-out pairs: pair accuracy of the summed log-probabilities, of the
    length-normalised ones (SimPO's), and the mean per-token log-prob gap chosen - rejected (KTO's
    desirable - undesirable)."""
    from dsft.adapters.lora import load_lora
    from dsft.config.schema import ModelSection
    from dsft.data.prepared import Spec, prepare
    from dsft.models.load import load_model, load_tokenizer, resolve_model_path
    from dsft.evaluate import example_losses

    tokenizer = load_tokenizer(run / "adapter")
    rows = prepare(Spec("dpo", [str(held)], "preference", fit={"max_prompt_length": 128, "prompt_overflow": "truncate"}),
                   tokenizer, quiet=True).dataset[:]
    sequences = {side: {"input_ids": [p + a for p, a in zip(rows["prompt_ids"], rows[side])],
                        "labels": [[-100] * len(p) + a for p, a in zip(rows["prompt_ids"], rows[side])]}
                 for side in ("chosen_ids", "rejected_ids")}
    section = ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32")
    model = load_lora(load_model(section, resolve_model_path(section.path)), str(run / "adapter")).eval()
    out = {}
    for name in ("base", "adapter"):
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            chosen, rejected = (example_losses(model, sequences[s], 8, tokenizer.pad_token_id) for s in sequences)
        pairs = list(zip(chosen, rejected))
        out[name] = {"accuracy": sum(rt > ct for (ct, _), (rt, _) in pairs) / len(pairs),
                     "normalised": sum(rt / rn > ct / cn for (ct, cn), (rt, rn) in pairs) / len(pairs),
                     "gap": sum(rt / rn - ct / cn for (ct, cn), (rt, rn) in pairs) / len(pairs)}
    return out


def _recipe(tmp: Path, name: str, train: Path, **changes) -> Path:
    recipe = yaml.safe_load((REPO / f"recipes/tiny-legal-{name}.yaml").read_text())
    recipe["data"]["train"] = str(train)
    # the shipped epochs (2); ORPO needs 4 to rank 9 of the 10 held-out pairs by their summed log-probs (8 at 2)
    recipe["training"].update(lr=5e-3, **({"epochs": 4} if name == "orpo" else {}))
    recipe["output_dir"] = str(tmp / name)
    for section, values in changes.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("name, metric", [("orpo", "accuracy"), ("simpo", "normalised"), ("kto", "gap")])
def test_each_objective_raises_its_metric_on_pairs_it_did_not_train_on(name: str, metric: str, tmp_path: Path, cli) -> None:
    train, held = _split(tmp_path)
    result = cli(name, "--recipe", _recipe(tmp_path, name, train, data={"eval": str(held)}))
    assert result.exit_code == 0, result.output
    # data.eval is scored once training ends, for every pair objective (no eval_steps set)
    held_out = json.loads((tmp_path / name / "run.json").read_text())["summary"]["held_out"]
    assert "eval_loss" in held_out and "eval_rewards/margins" in held_out and "held-out (data.eval): loss" in result.output
    scores = _scores(tmp_path / name, held)
    assert scores["adapter"][metric] > scores["base"][metric], scores
    if metric != "gap":
        assert scores["adapter"][metric] >= 0.9, scores
    run = tmp_path / name  # and the run is like any other: eval scores it, merge and vLLM export take its adapter
    for data, rows in ((held, "pairs"), (REPO / "data_templates/legal/eval.jsonl", "conversations")):
        scored = cli("eval", "--adapter", run, "--data", data, "--generations", "0")
        assert scored.exit_code == 0 and json.loads((run / "eval.json").read_text())["rows"] == rows, scored.output
    merged = cli("merge", "--adapter", run, "--out", tmp_path / "merged", "--verify")
    assert merged.exit_code == 0 and re.search(r"│ verdict +│ +ok │", merged.output), merged.output
    assert cli("export", "--adapter", run, "--out", tmp_path / "vllm").exit_code == 0
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["processes"] == 1 and summary["peak_host_gib"] > 0 and summary["train_tokens"] > 0


@pytest.mark.parametrize("name", ["sft", "dpo", "kto", "orpo", "simpo", "grpo"])
def test_only_the_chosen_experts_train_and_the_router_stays_frozen(name: str, make_recipe, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LoRA tensor of the plan changes (it received gradients), expert LoRA exists for the chosen
    experts only, and every other weight, the routers' included, is the base's after training."""
    import dsft.adapters.lora as lora_mod
    from dsft.config import load_recipe
    from dsft.models.load import load_model, resolve_model_path
    from dsft.train import objective as plugins
    from dsft.train import pipeline

    chosen = {1: [0, 3], 2: [5]}
    pairs = {"data": {"train": str(PAIRS), "format": "preference", "max_length": 160},
             name: {"max_prompt_length": 64}} if name != "sft" else {}
    if name == "grpo":  # completions the model generates, scored by a reward that varies within every group
        pairs = {"data": {"train": str(PROMPTS), "format": "prompt", "max_length": 160},
                 "grpo": {"max_prompt_length": 128, "max_completion_length": 8, "num_generations": 4,
                          "rewards": [{"builtin": "length", "target": 16, "unit": "characters"}]}}
    recipe = load_recipe(make_recipe(adapter={"routed_experts": chosen, "dropout": 0.0},
                                     training={"max_steps": 3, "micro_batch_size": 4}, **pairs), check_files=True)
    captured: dict = {}
    original = lora_mod.attach_lora

    def spy(model, adapter, selection):
        wrapped, targets = original(model, adapter, selection)
        captured["model"] = wrapped
        captured["before"] = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
        return wrapped, targets

    monkeypatch.setattr(lora_mod, "attach_lora", spy)
    goal = plugins.objective(name)
    pipeline.run(pipeline.preflight(recipe, goal, force=False), goal, force=False)
    trained = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    assert len(trained) == len(captured["before"])
    for param, before in captured["before"].items():
        assert not torch.equal(trained[param.replace(".default", "")], before), f"{name}: {param} did not train"
    for layer, experts in chosen.items():
        key = f"base_model.model.model.layers.{layer}.mlp.experts.lora_gate_up_A.weight"
        assert trained[key].shape[0] == len(experts)
    assert not any(".mlp.gate." in k for k in trained)
    base = load_model(recipe.model, resolve_model_path(recipe.model.path)).state_dict()
    after = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
             for n, p in captured["model"].named_parameters() if not p.requires_grad and ".ref." not in n}
    routers = [n for n in after if n.endswith(".mlp.gate.weight")]
    assert routers and all(torch.equal(after[n], base[n]) for n in after if n in base), name


def test_kto_rows_of_its_own_format_with_uneven_labels(make_recipe, cli, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (REPO / "data_templates/examples/kto.jsonl").read_text().splitlines()]
    desirable = [r for r in rows if r["label"]]
    data = write_jsonl(tmp_path / "feedback.jsonl", desirable * 3 + [r for r in rows if not r["label"]])
    recipe = make_recipe(data={"train": str(data), "format": "kto", "max_length": 128},
                         kto={"max_prompt_length": 64}, training={"max_steps": 2, "micro_batch_size": 4})
    result = cli("kto", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    counts = json.loads((tmp_path / "run/run.json").read_text())["summary"]["rows"]
    assert counts["desirable"] == 6 and counts["undesirable"] == 2 and counts["weights"] == "balanced by dsft"
    assert counts["desirable_weight"] * 6 == pytest.approx(counts["undesirable_weight"] * 2)
    assert "desirable / undesirable rows" in result.output


# ---------------------------------------------------------------- an objective from outside dsft

QA = "qa"


@pytest.fixture
def qa_plugin():
    """tests/qa_objective.py as a built-in would be: its module plus one row of dsft.train.BUILTIN, imported on
    first use; taken out again after the test, row, registration, section, format and converter."""
    import sys

    from dsft.config import registry, schema
    from dsft.data import formats
    from dsft.train import BUILTIN, Builtin
    from dsft.train import objective as plugins

    BUILTIN[QA] = Builtin("qa_objective", "Train on question / answer rows (an objective from tests/).")
    try:
        yield plugins.objective(QA)
    finally:
        del BUILTIN[QA]
        plugins.unregister(QA)
        sys.modules.pop("qa_objective", None)
    assert QA not in plugins.OBJECTIVES and QA not in registry.SECTIONS and "qa" not in registry.FORMATS
    assert "qa" not in formats.CONVERTERS and "qa" not in schema.recipe_model().model_fields


def test_an_objective_plugs_in_from_outside_dsft(qa_plugin, make_recipe, cli, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from dsft.cli._common import run_training, training_command
    from dsft.train import BUILTIN, dpo
    from dsft.train import objective as plugins

    assert not isinstance(qa_plugin, type(dpo.OBJECTIVE)) and type(qa_plugin).__mro__[1] is plugins.Objective
    rows = [{"q": m["messages"][-2]["content"], "a": m["messages"][-1]["content"]} for m in legal_rows(16)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    recipe = make_recipe(data={"train": str(data), "format": "qa"}, qa={"loss_scale": 10.0},
                         training={"max_steps": 2, "logging_steps": 1})
    bad = cli("validate", recipe, "--set", "qa.loss_weight=2")
    assert bad.exit_code == 2 and "qa.loss_weight: unknown key; remove it (valid keys here: init_adapter, loss_scale)" in bad.output
    app = typer.Typer()  # the command its table row makes, as dsft/cli/app.py makes one per row
    app.command(QA)(training_command(QA, BUILTIN[QA].help))
    app.command("help")(lambda: None)  # two commands: typer keeps the command name (one would be the root)
    command = CliRunner().invoke(app, [QA, "--recipe", str(recipe), "--set", f"output_dir={tmp_path / 'scaled'}"])
    assert command.exit_code == 0, command.output
    assert f"dsft qa: {tmp_path / 'scaled'}" in command.output and "qa loss first -> last" in command.output
    assert re.search(r"^step 1/2  loss \S+  lr \S+  epoch \S+", command.output, re.M), command.output  # its `shown`
    plain = run_training(QA, recipe, [f"output_dir={tmp_path / 'plain'}", "qa.loss_scale=1.0"], False, False, None, 1)
    scaled = [json.loads(line)["loss"] for line in (tmp_path / "scaled/metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert scaled[0] == pytest.approx(10 * plain.losses[0], rel=1e-4)  # the same first batch, its loss scaled by the section
    info = json.loads((tmp_path / "scaled/run.json").read_text())
    assert info["command"] == QA and info["status"] == "complete"
    assert info["summary"]["qa_scale"] == 10.0 and info["summary"]["processes"] == 1  # its fields, and the spine's
    assert info["summary"]["peak_host_gib"] > 0 and info["summary"]["train_tokens"] > 0
    assert yaml.safe_load((tmp_path / "scaled/recipe.yaml").read_text())["qa"]["loss_scale"] == 10.0
    card = (tmp_path / "scaled/README.md").read_text()
    assert "- qa: loss_scale 10.0" in card and "- qa: first loss " in card.split("## Final metrics")[1]
    assert json.loads((tmp_path / "scaled/adapter/dsft_adapter.json").read_text())["qa"]["loss_scale"] == 10.0


# ---------------------------------------------------------------- resume and processes (subprocesses: slow)

def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _pairs_recipe(make_recipe, name: str, out: Path, **training) -> Path:
    section = {"max_prompt_length": 64, **({"loss_type": "apo_zero_unpaired"} if name == "kto" else {})}
    return make_recipe(f"{name}-{out.name}.yaml", output_dir=str(out), adapter={"routed_experts": {1: [0, 3]}},
                       data={"train": str(PAIRS), "format": "preference", "max_length": 160}, **{name: section},
                       training={"lr": 5e-3, "scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 1, **training})


@pytest.mark.parametrize("name", ["dpo", "kto", "simpo"])  # ORPO runs SimPO's code path (trl.experimental's pair trainer)
def test_resume_at_every_checkpoint_equals_an_uninterrupted_run(name: str, make_recipe, cli, tmp_path: Path) -> None:
    """In-process: the run cut back to each checkpoint (the last included) and resumed ends as the uninterrupted
    run did (tests/test_resume.py keeps the real kill -9)."""
    from conftest import resume_at_every_checkpoint

    recipe = _pairs_recipe(make_recipe, name, tmp_path / "whole", max_steps=4, save_steps=2, micro_batch_size=4,
                           checkpoints_kept=4)
    resume_at_every_checkpoint(cli, name, recipe, tmp_path / "whole", tmp_path)
