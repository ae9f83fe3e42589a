"""`dsft eval` on a tiny trained run, and the recipe reference covering every schema key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pydantic import BaseModel

from conftest import REPO


def test_eval_prefers_the_adapter_on_rephrased_held_out_answers(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(training={"max_steps": 30, "micro_batch_size": 8, "lr": 5e-3},
                         data={"train": str(REPO / "data_templates/legal/train.jsonl"),
                               "eval": str(REPO / "data_templates/legal/eval.jsonl")})
    assert cli("sft", "--recipe", recipe).exit_code == 0
    result = cli("eval", "--adapter", tmp_path / "run", "--generations", 2, "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run/eval.json").read_text())
    assert report["examples"] == 57 and report["data"][0].endswith("eval.jsonl")
    assert report["adapter"]["loss"] < report["base"]["loss"] - 0.5
    assert set(report["routing_drift"]) == {"1", "2"} and len(report["answers"]) == 2
    assert "dsft eval:" in result.output and "routing drift" in result.output
    assert "57 examples, data.eval: held-out" in result.output.replace("\n", " ")
    assert report["data_kind"] == "held-out" and report["data_source"] == "data.eval" and report["run"] == str(tmp_path / "run")

    # the figure: base and adapter per example, exactly the losses in eval.json
    from dsft.evaluate import eval_figure

    assert (tmp_path / "run/eval.png").read_bytes()[:4] == b"\x89PNG"
    (ax,) = eval_figure(report).axes
    order = sorted(range(57), key=lambda i: report["base"]["example_loss"][i])
    drawn = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert drawn == {label: [report[name]["example_loss"][i] for i in order] for label, name in (("base", "base"), ("run", "adapter"))}
    assert ax.get_ylabel() == "loss (nats per assistant token)"
    assert eval_figure(report)._suptitle.get_text().startswith("dsft eval: run: 57 examples (held-out, data.eval)")
    assert sum(report["adapter"]["example_loss"]) < sum(report["base"]["example_loss"])

    # preference rows are scored as pairs, for an SFT run too: the chosen answer gains on the rejected one
    pairs = cli("eval", "--adapter", tmp_path / "run", "--data", REPO / "data_templates/legal/preference.jsonl",
                "--generations", 0)
    assert pairs.exit_code == 0, pairs.output
    scored = json.loads((tmp_path / "run/eval.json").read_text())
    assert scored["rows"] == "pairs" and scored["examples"] == 114
    base, adapted = scored["base"]["pairs"], scored["adapter"]["pairs"]
    assert len(adapted["margins"]) == 114 and adapted["accuracy"] == sum(m > 0 for m in adapted["margins"]) / 114
    assert adapted["margin"] > base["margin"] and adapted["accuracy"] > base["accuracy"]
    assert "log-prob acc (per token)" in pairs.output and "implicit reward acc" in pairs.output
    assert 0 <= adapted["normalized_accuracy"] <= 1 and scored["implicit_reward"]["reference"] == "the base"
    assert "implicit reward against the base (beta 0.1)" in pairs.output.replace("\n", " ")
    titles = [a.get_title() for a in eval_figure(scored).axes]
    assert titles == ["loss per example (lower is better)", "margin log p(chosen) - log p(rejected) per pair"]

    # a file mixing the two kinds is refused, naming the row
    rows = (REPO / "data_templates/legal/eval.jsonl").read_text().splitlines()[:3]
    rows.append((REPO / "data_templates/legal/preference.jsonl").read_text().splitlines()[0])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(rows) + "\n")
    refused = cli("eval", "--adapter", tmp_path / "run", "--data", mixed)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert f"{mixed}:4: a preference pair (chosen, rejected) in a file of conversations" in refused.output


def test_eval_refuses_a_directory_that_is_no_run(tmp_path: Path, cli) -> None:
    result = cli("eval", "--adapter", tmp_path)
    assert result.exit_code == 2 and "neither a dsft run directory nor an adapter directory" in result.output


def test_a_killed_runs_checkpoint_is_evaluated_chatted_merged_and_exported(make_recipe, cli, tmp_path: Path) -> None:
    """kill -9 leaves a run `running`, with checkpoints and no adapter/: eval on the run names its last
    checkpoint (with --force too); eval, chat, merge and export take the checkpoint itself, say which it is,
    and eval writes RUN/eval-checkpoint.json, not the run's eval.json."""
    import shutil

    assert cli("sft", "--recipe", make_recipe(training={"max_steps": 4, "save_steps": 2, "logging_steps": 2})).exit_code == 0
    run = tmp_path / "run"
    shutil.rmtree(run / "adapter")
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    checkpoint = run / "checkpoints/checkpoint-4"
    for extra in ((), ("--force",)):
        result = cli("eval", "--adapter", run, "--on-train", *extra)
        assert result.exit_code == 2 and (f"the run has no adapter/ (it stopped before it finished); evaluate its last "
                                          f"checkpoint with --adapter {checkpoint}") in result.output.replace("\n", " ")
    result = cli("eval", "--adapter", checkpoint, "--on-train", "--generations", 1, "--max-new-tokens", 3)
    assert result.exit_code == 0, result.output
    assert f"dsft eval: checkpoint-4 (step 4 of 4) of the stopped run {run}" in result.output.replace("\n", " ")
    report = json.loads((run / "eval-checkpoint.json").read_text())
    assert report["evaluated"].startswith("checkpoint-4") and not (run / "eval.json").exists()
    chat = cli("chat", "--adapter", checkpoint, "--base", "--prompt", "What is a deed?", "--max-new-tokens", 4)
    turn = chat.output[chat.output.index("you> What is a deed?\n"):].splitlines()  # the checkpoint's answer, the base's
    assert chat.exit_code == 0 and turn[1].startswith("adapter> ") and turn[2].startswith("base> "), chat.output
    merged = cli("merge", "--adapter", checkpoint, "--out", tmp_path / "merged")
    assert merged.exit_code == 0 and "checkpoint-4 (step 4 of 4) of the stopped run" in merged.output.replace("\n", " ")
    assert json.loads((tmp_path / "merged/dsft-merge.json").read_text())["adapter"] == str(checkpoint)
    exported = cli("export", "--adapter", checkpoint, "--format", "peft", "--out", tmp_path / "peft")
    assert exported.exit_code == 0 and "checkpoint-4 (step 4 of 4)" in exported.output.replace("\n", " ")


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        inner = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else inner
        if sub is not None and name not in ("attention", "shared_experts", "dense_mlp"):
            out += _keys(sub, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_recipe_reference_documents_every_key() -> None:
    from dsft.config.schema import recipe_model

    doc = (REPO / "docs/recipes.md").read_text()
    missing = [k for k in _keys(recipe_model()) if f"`{k.split('.')[-1]}`" not in doc and f"`{k.split('.', 1)[-1]}`" not in doc
               and f"`{k}`" not in doc]
    assert not missing, f"docs/recipes.md does not document {missing}"


def test_chat_answers_with_the_adapter(make_recipe, cli, tmp_path: Path, monkeypatch) -> None:
    import torch

    from dsft.adapters.lora import load_lora
    from dsft.config.schema import ModelSection
    from dsft.models.load import load_model, load_tokenizer, resolve_model_path

    assert cli("sft", "--recipe", make_recipe(training={"max_steps": 20})).exit_code == 0
    result = cli("chat", "--adapter", tmp_path / "run", "--prompt", "What is a lease?", "--max-new-tokens", 6)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("you> What is a lease?\n") and result.output.endswith("\n")
    # the answer is the adapter's: greedy decoding with the base alone says something else
    section = ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32")
    tokenizer = load_tokenizer(tmp_path / "run/adapter")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is a lease?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    model = load_lora(load_model(section, resolve_model_path(section.path)), str(tmp_path / "run/adapter")).eval()
    with torch.no_grad():
        adapter = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=2)[0, ids.shape[1]:]
        with model.disable_adapter():
            base = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=2)[0, ids.shape[1]:]
    assert not torch.equal(adapter, base)
    assert result.output.splitlines()[1].strip() == tokenizer.decode(adapter, skip_special_tokens=True).strip()


def test_piped_chat_is_a_transcript(make_recipe, cli, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dsft.cli.app import app

    assert cli("sft", "--recipe", make_recipe(training={"max_steps": 2})).exit_code == 0
    result = CliRunner().invoke(app, ["chat", "--adapter", str(tmp_path / "run"), "--max-new-tokens", "3"],
                                input="What is a deed?\n\nWhat is a lease?\n")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "you> What is a deed?" and "you> What is a lease?" in lines and result.output.endswith("\n")


def test_chat_with_prompt_never_asks_a_closed_stdin(finished_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--prompt` under nohup or a scheduler with stdin closed: the answer, no traceback; without --prompt, one line."""
    import io
    import types

    from typer.testing import CliRunner

    from dsft.cli import chat
    from dsft.cli.app import app

    closed = io.TextIOWrapper(io.BytesIO())
    closed.close()
    monkeypatch.setattr(chat, "sys", types.SimpleNamespace(stdin=closed))
    result = CliRunner().invoke(app, ["chat", "--adapter", str(finished_run), "--prompt", "What is a deed?",
                                      "--max-new-tokens", "2"])
    assert result.exit_code == 0 and result.output.startswith("you> What is a deed?\n"), result.output
    monkeypatch.setattr(chat, "sys", types.SimpleNamespace(stdin=None))
    result = CliRunner().invoke(app, ["chat", "--adapter", str(finished_run), "--max-new-tokens", "2"])
    assert result.exit_code == 2 and "stdin: closed, so there are no questions to read" in result.output, result.output


def test_ctrl_c_in_a_terminal_chat_stops_the_answer_not_the_session(finished_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while an answer is written stops that answer and asks again (the question dropped from the
    history); Ctrl-C at the prompt clears the line; the session ends with an empty line, exit 0."""
    import builtins

    from peft import PeftModelForCausalLM as PeftModel
    from typer.testing import CliRunner

    from dsft.cli import chat
    from dsft.cli.app import app

    typed = iter(["What is a deed?", KeyboardInterrupt, "What is a lease?", ""])

    def fake_input(prompt: str = "") -> str:
        item = next(typed)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        print(prompt + item)
        return item

    calls, real = [], PeftModel.generate

    def generate(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[1])
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the first answer
        return real(self, *args, **kwargs)

    monkeypatch.setattr(chat, "_terminal_stdin", lambda: True)
    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(PeftModel, "generate", generate)
    result = CliRunner().invoke(app, ["chat", "--adapter", str(finished_run), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "(answer stopped; the question is dropped from the conversation" in result.output
    assert len(calls) == 2 and calls[1] < calls[0] + 12  # the second prompt holds the second question only