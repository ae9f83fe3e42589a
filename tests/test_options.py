"""Options users of Axolotl / LLaMA-Factory expect, each checked for its effect: ShareGPT rows, the
optimizer, how many checkpoints are kept, early stopping on the held-out loss."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import legal_rows, write_jsonl


def _sharegpt(rows: list[dict]) -> list[dict]:
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in r["messages"]]} for r in rows]


def test_sharegpt_rows_are_the_same_conversations_as_messages(tmp_path: Path, make_recipe, cli) -> None:
    from dsft.data.prepared import Spec, prepare
    from dsft.models.load import load_tokenizer, resolve_model_path

    rows = legal_rows(12)
    messages = write_jsonl(tmp_path / "messages.jsonl", rows)
    share = write_jsonl(tmp_path / "sharegpt.jsonl", _sharegpt(rows))
    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny-deepseek-v3"))
    a = prepare(Spec("sft", [str(messages)], "messages", "m"), tokenizer, quiet=True)
    b = prepare(Spec("sft", [str(share)], "sharegpt", "s"), tokenizer, quiet=True)
    assert a.dataset["input_ids"] == b.dataset["input_ids"] and a.dataset["loss_mask"] == b.dataset["loss_mask"]
    recipe = make_recipe(data={"train": str(share), "format": "sharegpt"}, training={"max_steps": 2})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output


def test_the_optimizer_is_the_one_the_recipe_names(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from dsft.config.schema import Recipe
    from dsft.train.pipeline import trainer_args

    base = {"model": {"path": "builtin:tiny-deepseek-v3"}, "data": {"train": "x.jsonl"}, "output_dir": str(tmp_path / "r")}
    classes = {}
    for name in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
        recipe = Recipe.model_validate({**base, "training": {"optimizer": name}})
        optim = trainer_args(recipe, tmp_path, torch.float32)["optim"]
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True))
        classes[name] = (cls.__module__.split(".")[0], cls.__name__, kwargs.get("optim_bits"), kwargs.get("is_paged"))
    assert classes["adamw"][:2] == ("torch", "AdamW")
    assert classes["adamw_8bit"] == ("bitsandbytes", "AdamW", 8, False)
    assert classes["paged_adamw_8bit"] == ("bitsandbytes", "AdamW", 8, True)


def test_a_run_trains_with_torch_adamw_by_default(make_recipe, cli, tmp_path: Path, monkeypatch) -> None:
    from trl import SFTTrainer

    seen = {}
    original = SFTTrainer.create_optimizer

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        seen["optimizer"] = type(self.optimizer).__module__ + "." + type(self.optimizer).__name__
        return out

    monkeypatch.setattr(SFTTrainer, "create_optimizer", spy)
    result = cli("sft", "--recipe", make_recipe(training={"max_steps": 2, "save_steps": 1, "checkpoints_kept": 1}))
    assert result.exit_code == 0, result.output
    assert seen["optimizer"].startswith("torch.optim") and seen["optimizer"].endswith("AdamW")
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["checkpoint-2"]


def test_checkpoints_kept(make_recipe, cli, tmp_path: Path) -> None:
    result = cli("sft", "--recipe", make_recipe(training={"max_steps": 5, "save_steps": 1, "checkpoints_kept": 3}))
    assert result.exit_code == 0, result.output
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run/checkpoints").iterdir())
    assert kept == [3, 4, 5]


def test_early_stopping_stops_on_the_held_out_loss_and_says_why(make_recipe, cli, tmp_path: Path) -> None:
    held = write_jsonl(tmp_path / "held.jsonl", legal_rows(8))
    # min_delta far above any change a step makes: the second evaluation is "no improvement"
    recipe = make_recipe(data={"eval": str(held)}, training={"max_steps": 30, "eval_steps": 2, "save_steps": 1000,
                                                             "early_stopping": {"patience": 2, "min_delta": 100.0}})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run/run.json").read_text())["summary"]
    stop = summary["early_stopping"]
    assert stop["stopped_at_step"] == 6 and stop["best_step"] == 2 and stop["evaluations_without_improvement"] == 2
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == 6 and [r["step"] for r in logged if "eval_loss" in r][:3] == [2, 4, 6]
    assert "early stopping at step 6/30" in result.output.replace("\n", " ")
    assert "early stopping at step 6 of 30" in (tmp_path / "run/README.md").read_text()
    # a loss that keeps improving runs to the end, and the summary says it was not stopped
    recipe = make_recipe(data={"eval": str(held)}, training={"max_steps": 4, "eval_steps": 2, "save_steps": 1000, "lr": 1e-2,
                                                             "early_stopping": {"patience": 3}})
    result = cli("sft", "--recipe", recipe, "--force")
    assert result.exit_code == 0, result.output
    stop = json.loads((tmp_path / "run/run.json").read_text())["summary"]["early_stopping"]
    assert stop["stopped_at_step"] is None


def test_early_stopping_decides_from_the_history() -> None:
    from dsft.train.callbacks import EarlyStop

    stop = EarlyStop(patience=2, min_delta=0.01)
    assert not stop.decide([(1, 2.0), (2, 1.5), (3, 1.495)])["stop"]  # one evaluation without improvement
    verdict = stop.decide([(1, 2.0), (2, 1.5), (3, 1.495), (4, 1.6)])
    assert verdict["stop"] and verdict["best_step"] == 2
    assert not stop.decide([(1, 2.0), (2, 2.1), (3, 1.9)])["stop"]  # improvement resets the count


def test_weighted_files_are_mixed_as_the_recipe_says_and_recorded(tmp_path: Path, make_recipe, cli) -> None:
    """Two files, one repeated twice (weight 2), one sampled (rows 3): the trainer sees exactly that mix,
    run.json records it, the resolved recipe keeps the entries, and --resume reads the same mix."""
    a = write_jsonl(tmp_path / "a.jsonl", legal_rows(6))
    b = write_jsonl(tmp_path / "b.jsonl", legal_rows(10)[4:])
    recipe = make_recipe(data={"train": [{"path": str(a), "weight": 2}, {"path": str(b), "rows": 3}]},
                         training={"max_steps": 2, "micro_batch_size": 5})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run/run.json").read_text())
    mix = info["summary"]["data_mix"]
    assert [(m["rows_in_file"], m["rows_used"]) for m in mix] == [(6, 12), (6, 3)]
    assert mix[0]["weight"] == 2.0 and mix[1]["rows"] == 3 and info["summary"]["train_rows"] == 15
    import yaml

    resolved = yaml.safe_load((tmp_path / "run/recipe.yaml").read_text())["data"]["train"]
    assert resolved == [{"path": str(a.resolve()), "weight": 2.0}, {"path": str(b.resolve()), "rows": 3}]

    from dsft.data.prepared import Spec, mix_counts, prepare_mix
    from dsft.models.load import load_tokenizer, resolve_model_path

    takes = mix_counts([6, 6], [{"weight": 2.0}, {"rows": 3}], 42)
    assert list(takes[0]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5] and len(set(takes[1])) == 3
    assert [len(t) for t in mix_counts([10], [{"weight": 0.3}], 1)] == [3]
    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny-deepseek-v3"))
    mixed = prepare_mix(lambda files: Spec("sft", files, "messages", "t"), [str(a), str(b)],
                        [{"weight": 2.0}, {"rows": 3}], 42, tokenizer)
    whole_b = prepare_mix(lambda files: Spec("sft", files, "messages", "t"), [str(b)], None, 42, tokenizer)
    ids = mixed.dataset["input_ids"]
    assert ids[0] == ids[1] and ids[12:] == [whole_b.dataset[int(i)]["input_ids"] for i in takes[1]]
    assert mixed.stats(128)["rows"] == 15 and len(mixed.trainable(128)) == 15


def test_mixing_is_for_sft(tmp_path: Path, cli) -> None:
    import yaml

    from conftest import REPO

    pairs = REPO / "data_templates/legal/preference.jsonl"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": "builtin:tiny-deepseek-v3"}, "output_dir": str(tmp_path / "run"),
                                      "data": {"train": [{"path": str(pairs), "weight": 2}], "format": "preference"}}))
    result = cli("dpo", "--recipe", recipe)
    assert result.exit_code == 2 and "data.train: `dsft dpo` takes its files whole" in result.output
