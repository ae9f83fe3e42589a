"""Prompts for the objectives that generate their own completions (`dsft grpo`): rows of `data.format:
prompt`, `{prompt}` (a string, or messages ending in a user turn) or `{messages}` ending in a user turn.
Every other field of a row (`answer`, `statute`, ...) is kept as it is and reaches the reward functions by
name. A prompt is rendered with the chat template's generation prompt and fitted to max_prompt_length as the
preference rows are (dsft.data.preference)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from dsft.data.formats import RowError
from dsft.data.preference import _prompt, _truncate

RESERVED = ("prompt", "messages", "completion", "completions", "completion_ids", "prompts", "trainer_state",
            "log_extra", "log_metric", "environments")  # names TRL passes reward functions itself
ROW = "dsft_row"  # the column holding a row's FILE:LINE (for errors naming the row; not passed to rewards)
PROMPT_TEXT = "dsft_prompt"  # a row's prompt as its own string (None for messages): rewards get strings for strings
OWN = "dsft_"  # fields named so are dsft's (ROW, PROMPT_TEXT): a row's own field of such a name is refused, never replaced
# The cache stores a row's place as `INDEX:LINE` (its file's index in data.train): an entry is keyed by content,
# so the same rows in a file elsewhere share it, and their places are read against the files of the run.


def to_prompt(row: Any, system_prompt: str | None = None) -> dict[str, Any]:
    """A row as {prompt: messages, columns: its other fields}; raises RowError for a row that is no prompt."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(f"a row must be an object, got {type(row).__name__}")
    text = None
    if "prompt" in row:
        prompt, rest = _prompt(row["prompt"]), {k: v for k, v in row.items() if k != "prompt"}
        text = row["prompt"] if isinstance(row["prompt"], str) else None
    elif "messages" in row:
        messages = row["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and messages[-1].get("role") != "user":
            raise RowError("field 'messages' must end with a user turn (the completion is generated)")
        prompt, rest = _prompt(messages), {k: v for k, v in row.items() if k != "messages"}
    else:
        raise RowError("missing field 'prompt' (or 'messages' ending in a user turn); data.format is prompt")
    clash = sorted(set(rest) & set(RESERVED))
    if clash:
        raise RowError(f"field {clash[0]!r}: TRL passes reward functions a keyword of that name itself; rename the column")
    own = sorted(k for k in rest if str(k).startswith(OWN))
    if own:
        raise RowError(f"field {own[0]!r}: names starting with {OWN!r} are dsft's own (`{ROW}` carries a row's "
                       "FILE:LINE); rename the column")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return {"prompt": prompt, "columns": rest, "text": text}


def _place(where: str, files: list[str]) -> str:
    """`FILE:LINE` as `INDEX:LINE` (see ROW)."""
    for i, name in enumerate(files):
        if where.startswith(f"{name}:"):
            return f"{i}:{where[len(name) + 1:]}"
    return ""


def place(stored: str, files: list[str]) -> str:
    """A stored `INDEX:LINE` as `FILE:LINE` of `files`."""
    index, _, line = stored.partition(":")
    return f"{files[int(index)]}:{line}" if index.isdigit() and int(index) < len(files) else ""


def tokenize_prompts(tokenizer: Any, rows: list[dict[str, Any]], max_prompt_length: int,
                     prompt_overflow: str, files: list[str] | None = None) -> dict[str, Any]:
    """Columns of prompt rows as dsft.data.prepared stores them: `prompt_ids` (rendered with the generation
    prompt, fitted to max_prompt_length), `prompt_length` (= `length`), the fitted prompt and the other fields
    as JSON text (`prompt`, `columns`), and the row's FILE:LINE; `rows`, `truncated`, `dropped` count them."""
    from dsft.data.tokenize import encode, list_column

    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731
    encoded = encode(tokenizer, [render(r["prompt"]) for r in rows])
    kept, truncated, dropped = [], 0, 0
    for row, e in zip(rows, encoded):
        if len(e.ids) <= max_prompt_length:
            kept.append((row, e.ids))
        elif prompt_overflow == "drop":
            dropped += 1
        else:
            fitted = {**row, "prompt": _truncate(tokenizer, row["prompt"], max_prompt_length)}
            kept.append((fitted, encode(tokenizer, [render(fitted["prompt"])])[0].ids))
            truncated += 1
    ids = [np.asarray(i, dtype=np.int32) for _, i in kept]
    lengths = np.asarray([len(i) for i in ids], dtype=np.int32)
    text = lambda values: np.asarray(values, dtype=object)  # noqa: E731
    return {"prompt_ids": list_column(ids, np.int32), "prompt_length": lengths, "length": lengths.copy(),
            "prompt": text([json.dumps(r["prompt"], ensure_ascii=False) for r, _ in kept]),
            "columns": text([json.dumps(r["columns"], ensure_ascii=False, default=str) for r, _ in kept]),
            PROMPT_TEXT: text([json.dumps(r.get("text"), ensure_ascii=False) for r, _ in kept]),
            ROW: text([_place(r.get("where", ""), files or []) for r, _ in kept]),
            "rows": len(rows), "truncated": truncated, "dropped": dropped}


def as_rows(batch: dict[str, list[Any]], files: list[str]) -> dict[str, list[Any]]:
    """A batch of prepared prompt rows as the trainer reads them (a datasets transform): `prompt` messages, the
    row's own fields by name (None where a row lacks one), its FILE:LINE in `files` (the split's) and its prompt
    as the row's own string (PROMPT_TEXT; None for messages)."""
    prompts = [json.loads(p) for p in batch["prompt"]]
    columns = [json.loads(c) for c in batch["columns"]]
    names = sorted({k for c in columns for k in c})
    out: dict[str, list[Any]] = {"prompt": prompts, **{k: [c.get(k) for c in columns] for k in names}}
    out[ROW] = [place(p, files) for p in batch[ROW]]
    out[PROMPT_TEXT] = [json.loads(t) for t in batch[PROMPT_TEXT]]
    return out
