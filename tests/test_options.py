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
    from dsft.train.settings import trainer_args

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


def _sharegpt(rows: list[dict]) -> list[dict]:
    """legal_rows as ShareGPT rows (`conversations` of {from, value})."""
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in r["messages"]]} for r in rows]


def test_weights_are_shares_of_a_mix_of_formats_stated_in_the_plan_and_the_card(tmp_path: Path, make_recipe, cli) -> None:
    """A messages file and a ShareGPT file with weights 3 and 1: they hold 16 rows together, and the mix takes
    12 and 4 of them (3:1), each file in its own format; a third file with `rows: 3` adds exactly 3. run.json,
    the plan and the model card state the split; the resolved recipe keeps the entries as written."""
    a = write_jsonl(tmp_path / "a.jsonl", legal_rows(6))
    b = write_jsonl(tmp_path / "b.jsonl", _sharegpt(legal_rows(10)))
    c = write_jsonl(tmp_path / "c.jsonl", legal_rows(8)[5:])
    entries = [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1, "format": "sharegpt"},
               {"path": str(c), "rows": 3}]
    recipe = make_recipe(data={"train": entries}, training={"max_steps": 2, "micro_batch_size": 5})
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run/run.json").read_text())
    mix = info["summary"]["data_mix"]
    assert [(m["rows_in_file"], m["rows_used"]) for m in mix] == [(6, 12), (10, 4), (3, 3)]
    assert mix[0]["rows_used"] == 3 * mix[1]["rows_used"] and info["summary"]["train_rows"] == 19
    assert [m["format"] for m in mix] == ["messages", "sharegpt", "messages"]
    text = result.output.replace("\n", " ")
    assert "a.jsonl: 12 rows (63%; weight 3, 6 in the file, messages)" in text
    assert "b.jsonl: 4 rows (21%; weight 1, 10 in the file, sharegpt)" in text and "prepared in None" not in text
    card = (tmp_path / "run/README.md").read_text()
    assert "12 of its 6 rows, 63% of the mix (weight 3)" in card and "format `sharegpt`" in card
    import yaml

    resolved = yaml.safe_load((tmp_path / "run/recipe.yaml").read_text())["data"]["train"]
    assert resolved == [{"path": str(a.resolve()), "weight": 3.0}, {"path": str(b.resolve()), "weight": 1.0, "format": "sharegpt"},
                        {"path": str(c.resolve()), "rows": 3}]

    from dsft.data.prepared import Spec, mix_counts, prepare, prepare_mix
    from dsft.models.load import load_tokenizer, resolve_model_path

    takes = mix_counts([6, 10, 3], [{"weight": 3.0}, {"weight": 1.0}, {"rows": 3}], 42)
    assert [len(t) for t in takes] == [12, 4, 3] and list(takes[0]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert len(set(takes[1])) == 4 and [len(t) for t in mix_counts([10, 30], [{"weight": 1.0}, None], 1)] == [10, 30]
    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny-deepseek-v3"))
    spec = Spec("sft", [str(a), str(b)], "messages", "t", formats=["messages", "sharegpt"])
    mixed = prepare_mix(spec, [{"weight": 3.0}, {"weight": 1.0}], 42, tokenizer)
    plain = prepare(Spec("sft", [str(a)], "messages", "t"), tokenizer, quiet=True)
    same = prepare(Spec("sft", [str(b)], "sharegpt", "t"), tokenizer, quiet=True)
    ids = mixed.dataset["input_ids"]
    assert ids[0] == ids[1] == plain.dataset[0]["input_ids"]  # weight 3 of 6 rows in a pool of 16: each twice
    assert ids[12:] == [same.dataset[int(i)]["input_ids"] for i in mix_counts([6, 10], [{"weight": 3.0}, {"weight": 1.0}], 42)[1]]
    assert sorted(mixed.distinct().tolist()) == [0, 2, 4, 6, 8, 10, 12, 13, 14, 15]  # a repeated row counts once


def test_a_column_map_and_0_1_labels_read_a_users_kto_file(tmp_path: Path, cli) -> None:
    """`response` / `feedback` columns mapped with `columns`, labels written 1 / 0: KTO trains; without the map,
    each row's error names its fields and the entry that maps them."""
    import yaml

    rows = [{"question": f"What is a {w}?", "response": f"A {w} is a thing.", "feedback": i % 2}
            for i, w in enumerate(["deed", "lease", "lien", "tort", "writ", "bond"])]
    data = write_jsonl(tmp_path / "feedback.jsonl", rows)
    recipe = {"model": {"path": "builtin:tiny-deepseek-v3", "dtype": "float32"}, "output_dir": str(tmp_path / "run"),
              "data": {"train": [{"path": str(data), "columns": {"prompt": "question", "completion": "response",
                                                                  "label": "feedback"}}], "format": "kto", "max_length": 64},
              "kto": {"max_prompt_length": 32}, "training": {"max_steps": 1, "micro_batch_size": 2}}
    (tmp_path / "kto.yaml").write_text(yaml.safe_dump(recipe))
    result = cli("kto", "--recipe", tmp_path / "kto.yaml")
    assert result.exit_code == 0, result.output
    counts = json.loads((tmp_path / "run/run.json").read_text())["summary"]["rows"]
    assert counts["desirable"] == 3 and counts["undesirable"] == 3
    recipe["data"]["train"] = [str(data)]
    recipe["output_dir"] = str(tmp_path / "run2")
    (tmp_path / "kto.yaml").write_text(yaml.safe_dump(recipe))
    result = cli("kto", "--recipe", tmp_path / "kto.yaml")
    assert result.exit_code == 2 and "feedback.jsonl:1: missing field 'label'" in result.output
    assert ("this row's fields are feedback, question, response: if one of them holds label, map it in the file's "
            "data.train entry: {path: FILE, columns: {label: COLUMN}}") in result.output.replace("\n", " ")


def test_mixing_is_for_sft(tmp_path: Path, cli) -> None:
    import yaml

    from conftest import REPO

    pairs = REPO / "data_templates/legal/preference.jsonl"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": "builtin:tiny-deepseek-v3"}, "output_dir": str(tmp_path / "run"),
                                      "data": {"train": [{"path": str(pairs), "weight": 2}], "format": "preference"}}))
    result = cli("dpo", "--recipe", recipe)
    assert result.exit_code == 2 and "data.train: `dsft dpo` takes its files whole; leave weight and rows out" in result.output
