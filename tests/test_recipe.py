"""Recipe validation: every error at once, with dotted paths, exit code 2; shipped recipes pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def test_four_errors_reported_at_once(tmp_path: Path, cli) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "model": {"path": "builtin:tiny-deepseek-v3", "colour": "blue"},
        "data": {"train": str(tmp_path / "missing.jsonl"), "max_length": "lots"},
        "training": {"lr": -1},
        "output_dir": str(tmp_path / "run"),
    }))
    result = cli("validate", bad, "--check-files")
    assert result.exit_code == 2
    out = result.output
    assert "model.colour: unknown key" in out
    assert "data.max_length: must be an integer" in out
    assert "training.lr: must be > 0" in out
    assert "data.train: file not found" in out and "missing.jsonl" in out
    assert out.count("error:") == 4


def test_missing_section_and_bad_choice(tmp_path: Path, cli) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"path": "builtin:nope", "quantization": "int3"}, "output_dir": "x"}))
    result = cli("validate", bad)
    assert result.exit_code == 2
    assert "data: required; add it" in result.output
    assert "model.quantization: must be one of 'none' or 'nf4'" in result.output
    assert "model.path: unknown built-in model 'nope'" in result.output


def test_yaml_syntax_error_names_line(tmp_path: Path, cli) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: builtin:tiny-deepseek-v3\ndata: [unclosed\n")
    result = cli("validate", bad)
    assert result.exit_code == 2
    assert f"{bad}:" in result.output and "not valid YAML" in result.output


def test_set_overrides(make_recipe, cli) -> None:
    recipe = make_recipe()
    assert cli("validate", recipe, "--set", "training.lr=1e-4").exit_code == 0
    result = cli("validate", recipe, "--set", "training.lr=-3", "--set", "adapter.rank=4")
    assert result.exit_code == 2
    assert "training.lr: must be > 0" in result.output and "adapter.rank: unknown key" in result.output
    assert "write it as section.key=value" in cli("validate", recipe, "--set", "nonsense").output


@pytest.mark.parametrize("value,experts,rank", [("all", "all", None), ({1: [3, 0, 3]}, {1: [0, 3]}, None),
                                               ({"experts": {"2": [7]}, "r": 4, "alpha": 8}, {2: [7]}, 4)])
def test_routed_experts_forms(value, experts, rank, make_recipe, cli) -> None:
    """The shorthand and the full form mean the same selection: integer layers, sorted distinct expert ids."""
    from dsft.config import load_recipe

    recipe = make_recipe(adapter={"routed_experts": value})
    assert cli("validate", recipe).exit_code == 0
    routed = load_recipe(recipe).adapter.routed_experts
    assert routed.experts == experts and routed.r == rank and routed.enabled


def test_routed_experts_bad_forms(make_recipe, cli) -> None:
    result = cli("validate", make_recipe(adapter={"routed_experts": "some"}))
    assert result.exit_code == 2 and "adapter.routed_experts.experts: must be none, all, or a mapping" in result.output
    result = cli("validate", make_recipe(adapter={"routed_experts": {1: []}}))
    assert result.exit_code == 2 and "layer 1: give a non-empty list of integer expert ids" in result.output


def test_routed_experts_must_fit_the_model(make_recipe, cli, tmp_path: Path) -> None:
    result = cli("sft", "--recipe", make_recipe(adapter={"routed_experts": {0: [1], 2: [8]}}))
    assert result.exit_code == 2
    assert "layer 0 has no routed experts; MoE layers are 1..2" in result.output
    assert "layer 2: expert ids go up to 7, got 8" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    result = cli("validate", recipe)
    assert result.exit_code == 0, result.output
    # a recipe whose model or data are not in the repository says so in its first line, and validate names them
    missing = "do not exist:" in result.output
    assert missing == recipe.read_text().startswith("# Placeholders, not in this repository:"), result.output
    assert "no model or data file was read" in result.output
    if recipe.name.startswith("tiny-"):
        # a preference recipe may continue an SFT run that a fresh clone has not trained yet
        import yaml

        data = yaml.safe_load(recipe.read_text())
        unset = [arg for name, section in data.items() if isinstance(section, dict) and section.get("init_adapter")
                 for arg in ("--set", f"{name}.init_adapter=null")]
        result = cli("validate", recipe, "--check-files", *unset)
        assert result.exit_code == 0, result.output


def test_dpo_init_adapter_must_exist(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)
    result = cli("validate", REPO / "recipes/tiny-legal-dpo.yaml", "--check-files", "--set", f"dpo.init_adapter={tmp_path}")
    assert result.exit_code == 2 and "dpo.init_adapter:" in result.output and "point it at an SFT run" in result.output


def test_model_dir_checks(tmp_path: Path, make_recipe, cli) -> None:
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "deepseek_v2"}')
    (model / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001.safetensors"}}')
    result = cli("validate", make_recipe(model={"path": str(model)}), "--check-files")
    assert result.exit_code == 2
    assert "model.path:" in result.output
    assert "missing shards named by its index: model-00001.safetensors" in result.output
    assert "has no tokenizer" in result.output


HELP = [["--help"], ["validate", "--help"], ["sft", "--help"], ["dpo", "--help"], ["merge", "--help"],
        ["eval", "--help"], ["chat", "--help"], ["experts", "--help"], ["experts", "profile", "--help"],
        ["experts", "plan", "--help"], ["validate", "recipes/legal.yaml"]]


def test_help_is_fast_and_does_not_import_torch() -> None:
    code = ("import sys, time; start = time.perf_counter(); from dsft.cli.app import app; "
            "from typer.testing import CliRunner\n"
            f"for args in {HELP!r}:\n"
            "    r = CliRunner().invoke(app, args); assert r.exit_code == 0, (args, r.output)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert time.perf_counter() - start < 3, 'help is slow'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("config", sorted((REPO / "recipes/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(config: Path) -> None:
    """accelerate reads each config; precision is left to the recipe (model.dtype), and the header says
    how to launch it."""
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.mixed_precision == "no" and loaded.num_processes >= 2
    assert "accelerate launch --config_file recipes/accelerate/" + config.name in config.read_text()


@pytest.mark.parametrize("section, key, expected", [
    ("training", "learning_rate", "training.learning_rate: unknown key; dsft's is training.lr"),
    ("training", "gradient_accumulation_steps", "dsft's is training.grad_accum"),
    ("training", "num_train_epochs", "dsft's is training.epochs"),
    ("model", "load_in_4bit", "dsft's is model.quantization: nf4"),
    ("data", "cutoff_len", "dsft's is data.max_length"),
    ("adapter", "lora_alpha", "dsft's is adapter.alpha"),
])
def test_keys_other_tools_use_name_dsfts(section: str, key: str, expected: str, make_recipe, cli) -> None:
    from test_bad_inputs import refused

    refused(cli("validate", make_recipe(**{section: {key: 1}})), expected)


def test_a_default_max_prompt_length_fits_a_short_max_length(make_recipe, cli) -> None:
    """kto.max_prompt_length left at its default (512) with data.max_length 128: it becomes 64, never an error
    about a key the recipe does not set; written, it is checked as written."""
    from dsft.config import load_recipe

    pairs = str(REPO / "data_templates/legal/preference.jsonl")
    recipe = load_recipe(make_recipe(data={"train": pairs, "format": "preference", "max_length": 128}, kto={}))
    assert recipe.kto.max_prompt_length == 64
    grpo = load_recipe(make_recipe(data={"train": str(REPO / "data_templates/legal/prompts.jsonl"), "format": "prompt",
                                         "max_length": 160}, grpo={"rewards": [{"builtin": "think_format"}],
                                                                    "max_completion_length": 32},
                                   training={"micro_batch_size": 8}))
    assert grpo.grpo.max_prompt_length == 128
    result = cli("validate", make_recipe(data={"train": pairs, "format": "preference", "max_length": 128},
                                         kto={"max_prompt_length": 512}))
    assert result.exit_code == 2 and "kto.max_prompt_length (512) must be below data.max_length (128)" in result.output
