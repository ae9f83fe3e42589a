"""Preference pairs for DPO: rows with `prompt`, `chosen`, `rejected`.

Either strings (the prompt becomes a user turn) or conversational: `prompt` a list of messages, and
`chosen` / `rejected` an assistant message or a list of assistant messages. Every row becomes TRL's
conversational form, which TRL renders with the chat template. Bad rows are reported as FILE:LINE.
Prompts longer than `max_prompt_length` tokens are truncated from the left of their last user turn or
dropped, per the recipe (TRL 1.16's DPOConfig has no max_prompt_length).
"""

from __future__ import annotations

from typing import Any

from dsft.data.formats import Messages, RowError, checked_rows, raise_row_errors
from dsft.errors import DsftError, shown


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


def to_unpaired(row: Any, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """A KTO row (`prompt` or `messages` ending in an assistant turn, `completion`, `label` true / false),
    or a preference pair (its chosen answer desirable, its rejected one not), as unpaired rows."""
    if isinstance(row, dict) and "chosen" in row and "rejected" in row:
        pair = to_pair(row, system_prompt)
        return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(f"a row must be an object, got {type(row).__name__}")
    label = row.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false", "1", "0"):  # CSV has no booleans
        label = label.strip().lower() in ("true", "1")
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):  # 1 / 0, as many datasets write it
        label = bool(label)
    if label is None or label == "":
        raise RowError("missing field 'label' (true or 1 for a desirable completion, false or 0 for an undesirable one)")
    if not isinstance(label, bool):
        raise RowError(f"field 'label' must be true or false (or 1 or 0), got {shown(label)}")
    if "messages" in row and "completion" not in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2 or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "assistant":
            raise RowError("field 'messages' must end with the assistant turn being judged")
        prompt, completion = _prompt(messages[:-1]), _answer(messages[-1], "messages[-1]")
    else:
        prompt, completion = _prompt(row.get("prompt")), _answer(row.get("completion"), "completion")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return [{"prompt": prompt, "completion": completion, "label": label}]


def load_pairs(paths: list[str], system_prompt: str | None = None) -> list[dict[str, Messages]]:
    """All rows of all files as pairs (small files: training data goes through dsft.data.prepared)."""
    errors: list[str] = []
    pairs = list(checked_rows(paths, lambda row: to_pair(row, system_prompt), errors, "preference pairs"))
    raise_row_errors(errors)
    return pairs


def tokenize_answers(tokenizer: Any, rows: list[dict[str, Any]], sides: tuple[str, ...], max_prompt_length: int,
                     prompt_overflow: str, limit_key: str = "max_prompt_length") -> dict[str, Any]:
    """Rows as TRL's DPOTrainer and KTOTrainer tokenize them (their `_prepare_dataset`, so that TRL need not):
    the prompt rendered with the generation prompt, prompt + each answer (`sides`: chosen and rejected, or
    the completion) rendered whole, the answers starting where the prompt's tokens and every full sequence
    part. Prompts are fitted to `max_prompt_length` first (a longer one is cut from the left of its last user
    turn, or its row dropped). Columns as dsft.data.prepared stores them (`{side}_ids`, the prompt's, each
    row's prompt and first answer lengths); `rows`, `truncated` and `dropped` count the prompts; the other
    fields of a row (KTO's label) come back as columns. `limit_key`: max_prompt_length's recipe key, named in the
    error of a prompt whose template and earlier turns alone are longer."""
    import numpy as np

    from dsft.data.tokenize import encode, list_column

    render = lambda messages, gen: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    prompts = [e.ids for e in encode(tokenizer, [render(r["prompt"], True) for r in rows])]
    kept, truncated, dropped = [], 0, 0
    for row, ids in zip(rows, prompts):
        if len(ids) <= max_prompt_length:
            kept.append((row, ids))
        elif prompt_overflow == "drop":
            dropped += 1
        else:
            fitted = {**row, "prompt": _truncate(tokenizer, row["prompt"], max_prompt_length, limit_key)}
            kept.append((fitted, encode(tokenizer, [render(fitted["prompt"], True)])[0].ids))
            truncated += 1
    texts = [render(r["prompt"] + r[side], False) for r, _ in kept for side in sides]
    full = [np.asarray(e.ids, dtype=np.int32) for e in encode(tokenizer, texts)]
    columns: dict[str, list] = {"prompt_ids": [], **{f"{side}_ids": [] for side in sides}}
    for k, (_, ids) in enumerate(kept):
        ids = np.asarray(ids, dtype=np.int32)
        answers = full[k * len(sides):(k + 1) * len(sides)]
        n = min(_common_prefix(ids, answer) for answer in answers)
        columns["prompt_ids"].append(ids[:n])
        for side, answer in zip(sides, answers):
            columns[f"{side}_ids"].append(answer[n:])
    out: dict[str, Any] = {name: list_column(value, np.int32) for name, value in columns.items()}
    out["prompt_length"] = np.asarray([len(p) for p in columns["prompt_ids"]], dtype=np.int32)
    out["length"] = out["prompt_length"] + np.asarray([len(a) for a in columns[f"{sides[0]}_ids"]], dtype=np.int32)
    for name in sorted({k for r, _ in kept for k in r} - {"prompt", *sides}):
        out[name] = np.asarray([r[name] for r, _ in kept])
    return {**out, "rows": len(rows), "truncated": truncated, "dropped": dropped}


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


def _truncate(tokenizer: Any, prompt: Messages, limit: int, key: str = "max_prompt_length") -> Messages:
    """Drop tokens from the start of the last user turn until the rendered prompt fits."""
    prompt = [dict(m) for m in prompt]
    for _ in range(8):
        excess = _prompt_tokens(tokenizer, prompt) - limit
        if excess <= 0:
            return prompt
        ids = tokenizer(prompt[-1]["content"], add_special_tokens=False)["input_ids"]
        if excess >= len(ids):
            raise DsftError(f"{key} {limit} is shorter than the prompt's template and earlier turns; raise it")
        prompt[-1]["content"] = tokenizer.decode(ids[excess:])
    return prompt
