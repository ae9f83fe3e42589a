"""Preference pairs for DPO: rows with `prompt`, `chosen`, `rejected`.

Either strings (the prompt becomes a user turn) or conversational: `prompt` a list of messages, and
`chosen` / `rejected` an assistant message or a list of assistant messages. Every row becomes TRL's
conversational form, which TRL renders with the chat template. Bad rows are reported as FILE:LINE.
Prompts longer than `max_prompt_length` tokens are truncated from the left of their last user turn or
dropped, per the recipe (TRL 1.16's DPOConfig has no max_prompt_length).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft.data.formats import MAX_REPORTED, Messages, RowError, iter_rows
from dsft.errors import DsftError


@dataclass
class Pairs:
    rows: list[dict[str, Messages]]
    truncated: int = 0
    dropped: int = 0


def _answer(value: Any, field: str) -> Messages:
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        messages = [value]
    elif isinstance(value, list) and value:
        messages = value
    else:
        raise RowError(f"missing field {field!r}" if value in (None, "", []) else f"field {field!r} must be a string or assistant messages")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") != "assistant":
            raise RowError(f"field {field!r}: messages must have role 'assistant'")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise RowError(f"field {field!r} has empty text")
    return [{"role": "assistant", "content": m["content"]} for m in messages]


def _prompt(value: Any) -> Messages:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RowError(f"prompt[{i}] needs a role of system, user, assistant")
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise RowError(f"prompt[{i}] has empty text")
        if value[-1]["role"] != "user":
            raise RowError("the prompt must end with a user turn")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise RowError("missing field 'prompt'" if value in (None, "", []) else "field 'prompt' has empty text")


def to_pair(row: Any, system_prompt: str | None = None) -> dict[str, Messages]:
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(f"a row must be an object, got {type(row).__name__}")
    prompt = _prompt(row.get("prompt"))
    chosen, rejected = _answer(row.get("chosen"), "chosen"), _answer(row.get("rejected"), "rejected")
    if chosen == rejected:
        raise RowError("chosen and rejected are identical: nothing to prefer")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_pairs(paths: list[str], system_prompt: str | None = None) -> list[dict[str, Messages]]:
    pairs, errors = [], []
    for name in paths:
        path = Path(name)
        before = len(pairs)
        for where, row in iter_rows(path):
            try:
                pairs.append(to_pair(row, system_prompt))
            except RowError as e:
                errors.append(f"{where}: {e}")
        if len(pairs) == before and not any(err.startswith(f"{path}:") for err in errors):
            errors.append(f"{path}:1: the file has no rows; add preference pairs or remove it from the recipe")
    if errors:
        more = len(errors) - MAX_REPORTED
        raise DsftError(*errors[:MAX_REPORTED], f"... and {more} more bad rows" if more > 0 else "")
    return pairs


def fit_prompts(pairs: list[dict[str, Messages]], tokenizer: Any, max_prompt_length: int, overflow: str) -> Pairs:
    """Enforce `max_prompt_length` (tokens of the rendered prompt with its generation prompt)."""
    out = Pairs([])
    for pair in pairs:
        length = _prompt_tokens(tokenizer, pair["prompt"])
        if length <= max_prompt_length:
            out.rows.append(pair)
        elif overflow == "drop":
            out.dropped += 1
        else:
            out.rows.append({**pair, "prompt": _truncate(tokenizer, pair["prompt"], max_prompt_length)})
            out.truncated += 1
    return out


def _prompt_tokens(tokenizer: Any, prompt: Messages) -> int:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _truncate(tokenizer: Any, prompt: Messages, limit: int) -> Messages:
    """Drop tokens from the start of the last user turn until the rendered prompt fits."""
    prompt = [dict(m) for m in prompt]
    for _ in range(8):
        excess = _prompt_tokens(tokenizer, prompt) - limit
        if excess <= 0:
            return prompt
        ids = tokenizer(prompt[-1]["content"], add_special_tokens=False)["input_ids"]
        if excess >= len(ids):
            raise DsftError(f"dpo.max_prompt_length {limit} is shorter than the prompt's template and earlier turns; raise it")
        prompt[-1]["content"] = tokenizer.decode(ids[excess:])
    return prompt
