"""`dsft grpo`: the model learns a reward, generation and training see the same model (routing included),
rewards are checked before and during training, the reference is never a second base, and a GRPO run is
evaluated, merged and exported like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO

PROMPTS = REPO / "data_templates/legal/prompts.jsonl"
TINY = REPO / "recipes/tiny-grpo.yaml"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grpo_recipe(tmp: Path, name: str = "grpo.yaml", **changes) -> Path:
    """recipes/tiny-grpo.yaml with `changes` merged into its sections, writing under `tmp`."""
    recipe = yaml.safe_load(TINY.read_text())
    recipe["data"]["train"] = str(PROMPTS)
    recipe["output_dir"] = str(tmp / "run")
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """recipes/tiny-grpo.yaml as shipped (24 steps, group 4, completions of at most 16 tokens), a row logged
    per step."""
    from typer.testing import CliRunner

    from dsft.cli.app import app

    root = tmp_path_factory.mktemp("grpo")
    result = CliRunner().invoke(app, ["grpo", "--recipe", str(grpo_recipe(root, training={"logging_steps": 1}))])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_the_tiny_moe_learns_its_reward(grpo_run: Path) -> None:
    rows = [r for r in _rows(grpo_run / "metrics.jsonl") if "reward" in r and "loss" in r]
    assert len(rows) == 24
    first, last = (sum(r["reward"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last > first + 0.25, (first, last)  # measured: about -1.8 -> -1.4
    for key in ("rewards/length/mean", "rewards/length/std", "completions/mean_length", "completions/max_length",
                "completions/clipped_ratio", "clip_ratio/region_mean", "time/generation_s", "time/training_s",
                "generation/tokens_per_s"):
        assert all(key in r for r in rows), key
    assert all(r["completions/max_length"] <= 16 for r in rows)
    assert all(r["time/generation_s"] > 0 and r["generation/tokens_per_s"] > 0 for r in rows)


def test_completions_file_curves_card_and_summary(grpo_run: Path) -> None:
    from dsft.runs.metrics import read_metrics
    from dsft.train.curves import series
    from dsft.train.objective import objective
    from dsft.config.load import load_run_recipe

    shown = _rows(grpo_run / "completions.jsonl")
    assert sorted({r["step"] for r in shown}) == list(range(1, 25))
    assert all(len([r for r in shown if r["step"] == s]) == 4 for s in range(1, 25))
    metrics = {r["step"]: r for r in _rows(grpo_run / "metrics.jsonl") if "reward" in r}
    for row in shown:
        assert row["prompt"] and isinstance(row["completion"], str)
        expected = 1 - abs(len(row["completion"]) - 16) / 16  # the length reward of the text written
        assert row["rewards"]["length"] == pytest.approx(expected)
    # a step's four rows come from its own generation: their rewards lie within that step's logged spread
    step = shown[-1]["step"]
    assert min(r["rewards"]["length"] for r in shown if r["step"] == step) <= metrics[step]["reward"] + 4 * metrics[step]["reward_std"]

    recipe = load_run_recipe(grpo_run)
    panels = objective("grpo").curve_panels(recipe)
    drawn = series(read_metrics(grpo_run / "metrics.jsonl")[0], panels)
    assert set(drawn["reward (length)"]) == {"length"}  # one reward of weight 1: the total is that line, drawn once
    assert "groups with no reward spread (share; 1: nothing learned)" in drawn
    assert "completion length (tokens)" in drawn and (grpo_run / "curves.png").stat().st_size > 10_000
    card = (grpo_run / "README.md").read_text()
    assert "- grpo: rewards length x1" in card and "completions.jsonl" in card
    summary = json.loads((grpo_run / "run.json").read_text())["summary"]
    assert summary["settings"]["loss_type"] == "dapo" and summary["settings"]["beta"] == 0.0
    assert summary["reference"].startswith("none") and 0 < summary["generation_share"] < 1
    assert summary["last"]["reward"] > summary["first"]["reward"]


def test_eval_merge_verify_and_vllm_export_of_a_grpo_run(grpo_run: Path, cli, tmp_path: Path) -> None:
    conversations = REPO / "data_templates/legal/eval.jsonl"
    result = cli("eval", "--adapter", grpo_run, "--data", conversations)
    assert result.exit_code == 0, result.output
    merged = cli("merge", "--adapter", grpo_run, "--out", tmp_path / "merged", "--verify")
    assert merged.exit_code == 0 and "verif" in merged.output.lower(), merged.output
    exported = cli("export", "--adapter", grpo_run, "--format", "vllm", "--out", tmp_path / "vllm")
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "vllm/adapter_model.safetensors").is_file()


def test_generation_log_probs_equal_the_training_forward(tmp_path: Path) -> None:
    """Routing at generation agrees with routing at training: the log-probs `generate` sampled each token
    with (after temperature) equal TRL's training-mode forward over the same sequences (the one its policy
    ratio uses), with NF4 experts, expert LoRA and attention LoRA all non-zero, left-padded prompts."""
    from dsft.config import load_recipe
    from dsft.train import objective as plugins
    from dsft.train import pipeline, settings
    from dsft.train.grpo import rows_view
    from dsft.train.trainer import DsftGRPOTrainer

    recipe = load_recipe(grpo_recipe(tmp_path, model={"quantization": "nf4"},
                                     grpo={"temperature": 0.7, "num_generations": 2}), check_files=True)
    goal = plugins.objective("grpo")
    prepared = pipeline.preflight(recipe, goal, force=False)
    from dsft.adapters.lora import attach_lora
    from dsft.models.load import load_model

    torch.manual_seed(0)
    model, _ = attach_lora(load_model(recipe.model, prepared.model_path), recipe.adapter, prepared.selection)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    args = settings.trl_config(goal, recipe, prepared, tmp_path / "run", torch.float32)
    trainer = DsftGRPOTrainer(model=model, reward_funcs=prepared.data["rewards"], args=args,
                              train_dataset=rows_view(prepared.train, recipe.data.train, 160),
                              processing_class=prepared.tokenizer)
    tok = prepared.tokenizer
    prompts = [_rows(PROMPTS)[i]["prompt"] for i in (0, 3, 7)]
    tok.padding_side = "left"
    enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True, padding=True)
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # prompts of different lengths: padding on the left
    model.eval()
    out = model.generate(**enc, generation_config=trainer.generation_config, output_scores=True,
                         return_dict_in_generate=True, max_new_tokens=12)
    width = enc["input_ids"].shape[1]
    completion = out.sequences[:, width:]
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(2, completion[..., None])[..., 0]
    mask = torch.cat([enc["attention_mask"], torch.ones_like(completion)], 1)
    model.train()
    with torch.no_grad():
        trained, _, _ = trainer._get_per_token_logps_and_entropies(model, out.sequences, mask, completion.shape[1],
                                                                   batch_size=len(prompts))
    live = torch.isfinite(sampled)  # after an EOS generate pads; those positions are not trained on
    assert live.float().mean() > 0.5
    torch.testing.assert_close(trained[live], sampled[live], rtol=0, atol=2e-4)


def test_reference_is_the_adapter_switched_off_or_the_sft_copy(finished_run: Path, cli, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """beta > 0: a fresh adapter gets no "ref" copy (the adapter switched off is the base); continuing an SFT
    run, TRL's frozen copy of that adapter is the reference. KL is logged either way."""
    import dsft.train.grpo as grpo_mod

    seen: dict[str, list[str]] = {}
    original = grpo_mod.warm_up

    def spy(trainer, rewards):
        seen[Path(trainer.args.output_dir).parent.name] = sorted(trainer.model.peft_config)
        return original(trainer, rewards)

    monkeypatch.setattr(grpo_mod, "warm_up", spy)
    small = {"max_steps": 2, "micro_batch_size": 8, "save_steps": 100}
    fresh = grpo_recipe(tmp_path, "fresh.yaml", output_dir=str(tmp_path / "fresh"), training=small,
                        grpo={"beta": 0.1, "max_completion_length": 8})
    assert cli("grpo", "--recipe", fresh).exit_code == 0
    sft = grpo_recipe(tmp_path, "sft.yaml", output_dir=str(tmp_path / "continued"), training=small,
                      grpo={"beta": 0.1, "max_completion_length": 8, "init_adapter": str(finished_run)})
    result = cli("grpo", "--recipe", sft)
    assert result.exit_code == 0, result.output
    assert seen == {"fresh": ["default"], "continued": ["default", "ref"]}
    for run in ("fresh", "continued"):
        rows = [r for r in _rows(tmp_path / run / "metrics.jsonl") if "loss" in r]
        assert rows and all("kl" in r for r in rows)
    summary = json.loads((tmp_path / "continued/run.json").read_text())["summary"]
    assert summary["reference"] == "the SFT adapter's frozen copy"


def test_a_reward_failing_during_training_fails_the_run_and_keeps_its_checkpoints(cli, tmp_path: Path) -> None:
    """The checks before training pass (the function works at first); when it raises later, one line names
    the reward and the row, exit 2, run.json says failed, and the checkpoints saved so far are kept."""
    rewards = tmp_path / "flaky.py"
    rewards.write_text("CALLS = []\n\ndef flaky(prompts, completions, **kwargs):\n    CALLS.append(1)\n"
                       "    if len(CALLS) > 4:\n        raise RuntimeError('statute table unavailable')\n"
                       "    return [0.0 if i % 2 else 1.0 for i in range(len(completions))]\n")
    recipe = grpo_recipe(tmp_path, grpo={"max_completion_length": 8, "rewards": [{"function": f"{rewards}:flaky"}]},
                         training={"max_steps": 8, "micro_batch_size": 8, "save_steps": 1})
    result = cli("grpo", "--recipe", recipe)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "grpo.rewards[0] (flaky): raised RuntimeError: statute table unavailable (line 6 of flaky.py) on the row at" in errors[0]
    assert "prompts.jsonl:" in errors[0]
    info = json.loads((tmp_path / "run/run.json").read_text())
    assert info["status"] == "failed"
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").glob("checkpoint-*"))  # kept


@pytest.mark.parametrize("loss, grpo, expected", [
    ("dapo", {}, {"epsilon": 0.2, "epsilon_high": 0.28}),
    ("grpo", {}, {"epsilon": 0.2, "epsilon_high": 0.2}),
    ("dr_grpo", {"epsilon": 0.1}, {"epsilon": 0.1, "epsilon_high": 0.1}),
    ("bnpo", {"epsilon_high": 0.3}, {"epsilon": 0.2, "epsilon_high": 0.3}),
    ("cispo", {}, {"epsilon_high": 5.0}),
    ("cispo", {"epsilon_high": 3.0}, {"epsilon_high": 3.0}),
    ("sapo", {"sapo_temperature_neg": 1.2}, {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.2}),
    ("dapo", {"beta": 0.04, "kl_bias_correction": False}, {"beta": 0.04, "use_bias_correction_kl": False}),
    ("dapo", {"beta": 0.04}, {"beta": 0.04, "use_bias_correction_kl": True}),
])
def test_each_loss_type_gets_its_settings_in_trls_config(tmp_path: Path, loss: str, grpo: dict, expected: dict) -> None:
    """The GRPOConfig dsft builds: CISPO's cap is not the 0.2 TRL would take from epsilon, DAPO clips higher,
    SAPO gets its temperatures, the KL's bias correction follows the recipe; and the trainer reads them so."""
    from dsft.config import load_recipe
    from dsft.train import objective as plugins
    from dsft.train import settings

    recipe = load_recipe(grpo_recipe(tmp_path, grpo={"loss_type": loss, **grpo}))
    config = settings.trl_config(plugins.objective("grpo"), recipe, None, tmp_path / "run", torch.float32)
    assert config.loss_type == loss
    for key, value in expected.items():
        assert getattr(config, key) == pytest.approx(value), key
    if loss == "cispo":  # what GRPOTrainer clamps CISPO's importance weights at
        assert (config.epsilon_high if config.epsilon_high is not None else config.epsilon) == expected["epsilon_high"]


# ---------------------------------------------------------------- resume, and two processes (a subprocess: slow)

def _rewards(run: Path) -> dict[int, float]:
    return {r["step"]: r["reward"] for r in _rows(run / "metrics.jsonl") if "reward" in r and "loss" in r}


def test_resume_at_every_checkpoint_equals_an_uninterrupted_run(cli, tmp_path: Path) -> None:
    """In-process, cut back to each checkpoint (they fall between generations) and resumed: the same adapter and
    losses as the uninterrupted run, and completions.jsonl holds every step once."""
    from conftest import resume_at_every_checkpoint

    training = {"max_steps": 4, "save_steps": 2, "micro_batch_size": 8, "logging_steps": 1, "checkpoints_kept": 4}
    whole = grpo_recipe(tmp_path, "whole.yaml", output_dir=str(tmp_path / "whole"), training=training,
                        grpo={"max_completion_length": 8})
    resume_at_every_checkpoint(cli, "grpo", whole, tmp_path / "whole", tmp_path)
    assert _rewards(tmp_path / "cut-2") == pytest.approx(_rewards(tmp_path / "whole"), abs=1e-6)
    steps = [r["step"] for r in _rows(tmp_path / "cut-2/completions.jsonl")]
    assert sorted(set(steps)) == [1, 2, 3, 4] and len(steps) == 4 * 4  # every step's 4 completions, once
