"""Preference pairs for DPO: rows with `prompt`, `chosen`, `rejected`.

Either strings (the prompt becomes a user turn) or conversational: `prompt` a list of messages, and
`chosen` / `rejected` an assistant message or a list of assistant messages. Every row becomes TRL's
conversational form, which TRL renders with the chat template. Bad rows are reported as FILE:LINE.
Prompts longer than `max_prompt_length` tokens are truncated from the left of their last user turn or
dropped, per the recipe (TRL 1.16's DPOConfig has no max_prompt_length).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsft.data.formats import Messages, RowError, checked_rows, raise_row_errors
from dsft.errors import DsftError


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
    """All rows of all files as pairs (small files: training data goes through dsft.data.prepared)."""
    errors: list[str] = []
    pairs = list(checked_rows(paths, lambda row: to_pair(row, system_prompt), errors, "preference pairs"))
    raise_row_errors(errors)
    return pairs


def tokenize_pairs(tokenizer: Any, pairs: list[dict[str, Messages]], max_prompt_length: int,
                   prompt_overflow: str) -> dict[str, Any]:
    """Pairs as TRL's DPOTrainer tokenizes them (its `_prepare_dataset`, so that TRL need not): the prompt
    rendered with the generation prompt, prompt + chosen and prompt + rejected rendered whole, the answers
    starting where the prompt's tokens and each full sequence's part. Prompts are fitted to
    `max_prompt_length` first (a longer one is cut from the left of its last user turn, or dropped). Columns as dsft.data.prepared stores them; `pairs`,
    `truncated` and `dropped` count the prompts."""
    import numpy as np

    from dsft.data.tokenize import encode, list_column

    render = lambda messages, gen: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    prompts = [e.ids for e in encode(tokenizer, [render(p["prompt"], True) for p in pairs])]
    kept, truncated, dropped = [], 0, 0
    for pair, ids in zip(pairs, prompts):
        if len(ids) <= max_prompt_length:
            kept.append((pair, ids))
        elif prompt_overflow == "drop":
            dropped += 1
        else:
            fitted = {**pair, "prompt": _truncate(tokenizer, pair["prompt"], max_prompt_length)}
            kept.append((fitted, encode(tokenizer, [render(fitted["prompt"], True)])[0].ids))
            truncated += 1
    texts = [render(p["prompt"] + p[side], False) for p, _ in kept for side in ("chosen", "rejected")]
    full = [np.asarray(e.ids, dtype=np.int32) for e in encode(tokenizer, texts)]
    prompt_ids, chosen_ids, rejected_ids = [], [], []
    for (_, ids), chosen, rejected in zip(kept, full[0::2], full[1::2]):
        ids = np.asarray(ids, dtype=np.int32)
        n = min(_common_prefix(ids, chosen), _common_prefix(ids, rejected))
        prompt_ids.append(ids[:n])
        chosen_ids.append(chosen[n:])
        rejected_ids.append(rejected[n:])
    return {"prompt_ids": list_column(prompt_ids, np.int32), "chosen_ids": list_column(chosen_ids, np.int32),
            "rejected_ids": list_column(rejected_ids, np.int32),
            "prompt_length": np.asarray([len(p) for p in prompt_ids], dtype=np.int32),
            "length": np.asarray([len(p) + len(c) for p, c in zip(prompt_ids, chosen_ids)], dtype=np.int32),
            "pairs": len(pairs), "truncated": truncated, "dropped": dropped}


def _common_prefix(a: Any, b: Any) -> int:
    """How many leading tokens two id arrays share (TRL's common_prefix_length)."""
    import numpy as np

    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _prompt_tokens(tokenizer: Any, prompt: Messages) -> int:
    """Tokens of a prompt rendered with the generation prompt."""
    from dsft.data.tokenize import encode

    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return len(encode(tokenizer, [text])[0].ids)


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
