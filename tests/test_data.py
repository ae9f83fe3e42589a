"""Data formats, assistant-only masks, and FILE:LINE errors for bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from dsft.data.formats import load_conversations
from dsft.data.tokenize import IGNORE, tokenize_conversation
from dsft.errors import DsftError


@pytest.fixture(scope="module")
def tokenizer():
    from dsft.models.load import load_tokenizer

    return load_tokenizer(REPO / "dsft/models/builtin/tokenizer")


def test_mask_covers_assistant_tokens_only(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a lease?"},
        {"role": "assistant", "content": "A lease grants possession for rent."},
        {"role": "user", "content": "And an easement?"},
        {"role": "assistant", "content": "A right to use land."},
    ]
    out = tokenize_conversation(tokenizer, messages)
    kept = [t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE]
    dropped = [t for t, label in zip(out["input_ids"], out["labels"]) if label == IGNORE]
    eos = tokenizer.eos_token
    assert tokenizer.decode(kept) == f"A lease grants possession for rent.{eos}A right to use land.{eos}"
    assert tokenizer.decode(dropped) == (
        f"{tokenizer.bos_token}Be brief.<｜User｜>What is a lease?<｜Assistant｜><｜User｜>And an easement?<｜Assistant｜>"
    )
    full = tokenize_conversation(tokenizer, messages, assistant_only=False)
    assert full["labels"] == full["input_ids"] == out["input_ids"]


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "alpaca", "sharegpt"])
def test_example_files_parse(fmt: str) -> None:
    rows = load_conversations([str(REPO / f"data_templates/examples/{fmt}.jsonl")], fmt)
    assert len(rows) >= 2 and all(any(m["role"] == "assistant" for m in r) for r in rows)


def test_alpaca_input_joins_instruction() -> None:
    rows = load_conversations([str(REPO / "data_templates/examples/alpaca.jsonl")], "alpaca", system_prompt="S")
    assert rows[0][0] == {"role": "system", "content": "S"}
    assert rows[0][1]["content"].startswith("Summarise the clause in one sentence.\n\nThe Supplier")
    assert rows[1][1]["content"] == "What is a tort?"


def test_csv_rows_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"What is a deed?","A signed instrument."\n"What is a lien?",\n')
    with pytest.raises(DsftError) as err:
        load_conversations([str(path)], "prompt_completion")
    assert err.value.lines == [f"{path}:3: field 'completion' is empty"]  # an empty cell, not a missing column


def test_bad_rows_report_every_line(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, "{not json", {"text": "x"}, "", {"messages": [{"role": "user", "content": "q"}]}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DsftError) as err:
        load_conversations([str(path), str(empty)], "messages")
    lines = err.value.lines
    assert lines[0].startswith(f"{path}:2: not valid JSON")
    assert lines[1] == (f"{path}:3: missing field 'messages' (data.format is messages); this row's fields are text: if one "
                        "of them holds messages, map it in the file's data.train entry: {path: FILE, columns: {messages: COLUMN}}")
    assert lines[2] == f"{path}:5: no assistant message: nothing to learn from this row"
    assert lines[3] == f"{empty}:1: the file has no rows; add examples or remove it from the recipe"


@pytest.mark.parametrize("rows", [["{broken"], [{"prompt": "only a prompt"}], []], ids=["json", "field", "empty"])
def test_sft_refuses_bad_data_and_creates_nothing(rows, tmp_path: Path, make_recipe, cli) -> None:
    recipe = make_recipe()
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = cli("sft", "--recipe", recipe, "--set", f"data.train={data}", "--set", "data.format=prompt_completion")
    assert result.exit_code == 2
    assert f"{data}:1:" in result.output
    assert not (tmp_path / "run").exists()


def test_builtin_tokenizer_uses_the_shipped_template(tokenizer) -> None:
    assert tokenizer.chat_template == (REPO / "data_templates/chat_templates/deepseek-v3.jinja").read_text()


def test_v2_template_masks_answers(tokenizer) -> None:
    template = (REPO / "data_templates/chat_templates/deepseek-v2.jinja").read_text()
    tokenizer.chat_template = template
    try:
        messages = [{"role": "user", "content": "Define a lien."}, {"role": "assistant", "content": "A security interest."}]
        out = tokenize_conversation(tokenizer, messages)
        kept = [t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE]
        assert tokenizer.decode(kept) == f" A security interest.{tokenizer.eos_token}"
    finally:
        tokenizer.chat_template = (REPO / "data_templates/chat_templates/deepseek-v3.jinja").read_text()


def test_a_json_error_reads_once(tmp_path) -> None:
    """json's own message ends in "at" for some errors ("Invalid control character at"): said once."""
    from dsft.data.formats import iter_rows

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"messages": "a\tb"}\n')
    (where, error), = list(iter_rows(path))
    assert str(error) == "not valid JSON (Invalid control character at column 16); fix or remove the line"
