"""dsft.data.tokenize as it was before tokenization was batched and cached (dsft 2026-12-04, def5553): the
reference the prepared-data tests compare against, bit for bit. Not used by dsft."""

from __future__ import annotations

import os
from typing import Any

from dsft.data.formats import Messages
from dsft.errors import DsftError

IGNORE = -100


def _render(tokenizer: Any, messages: Messages, template: str | None, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
    )


def assistant_spans(tokenizer: Any, messages: Messages, template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of every assistant turn in it."""
    text = _render(tokenizer, messages, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], template)
        if not through.startswith(before):
            # R1-Distill's newer templates open `<think>\n` in the generation prompt but render a past turn
            # without it: the turn starts where the two renders part, after the conversation before it.
            shared = os.path.commonprefix([before, through])
            if len(shared) >= len(_render(tokenizer, messages[:i], template)):
                before = shared
        if not (through.startswith(before) and text.startswith(through)):
            raise DsftError(
                "chat template: rendering a conversation's first turns does not give a prefix of the whole "
                "render, so assistant tokens cannot be located; set data.assistant_only_loss: false or use a "
                "template that renders turns in order (data.chat_template)"
            )
        spans.append((len(before), len(through)))
    return text, spans


THINK_END = "</think>"


def reasoning_turn(tokenizer: Any, messages: Messages, template: str | None = None) -> tuple[str, int] | None:
    """For a final assistant turn with a reasoning trace that the template drops (DeepSeek-R1-Distill's
    templates apply `content.split('</think>')[-1]` to every assistant turn, the last one included): the
    training text and where the trained part starts. The text is the conversation so far rendered with the
    generation prompt, then the raw reasoning, `</think>`, the answer and EOS; an opening `<think>` the
    prompt already ends with (newer template revisions) is not repeated, and the rendered prompt's BOS is
    the only one. None when the template keeps the turn as written."""
    last = messages[-1]
    if last["role"] != "assistant" or THINK_END not in last["content"]:
        return None
    if last["content"] in _render(tokenizer, messages, template):
        return None
    prompt = _render(tokenizer, messages[:-1], template, generation_prompt=True)
    content = last["content"]
    for opening in ("<think>\n", "<think>"):
        if prompt.endswith(opening) and content.startswith(opening):
            content = content[len(opening):]
            break
    return prompt + content + (tokenizer.eos_token or ""), len(prompt)


def tokenize_conversation(
    tokenizer: Any, messages: Messages, template: str | None = None, assistant_only: bool = True
) -> dict[str, list[int]]:
    """`input_ids` and `labels` (IGNORE outside assistant turns when `assistant_only`). A final turn whose
    reasoning the template would drop is trained on as written (`reasoning_turn`)."""
    reasoning = reasoning_turn(tokenizer, messages, template)
    if reasoning is not None:
        text, start = reasoning
        spans = assistant_spans(tokenizer, messages[:-1], template)[1] if len(messages) > 1 else []
        spans = [*spans, (start, len(text))]
    else:
        text, spans = assistant_spans(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if not assistant_only:
        return {"input_ids": ids, "labels": list(ids)}
    labels = [
        tok if any(lo <= start < hi for lo, hi in spans) else IGNORE
        for tok, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return {"input_ids": ids, "labels": labels}


TOKENIZE_PHASE_ROWS = 2000  # fewer rows than this tokenize in a moment: no progress display


def tokenize_all(
    tokenizer: Any, conversations: list[Messages], template: str | None, assistant_only: bool,
    description: str = "tokenizing",
) -> dict[str, list[list[int]]]:
    from dsft.console import track

    rows = [tokenize_conversation(tokenizer, m, template, assistant_only)
            for m in track(conversations, description, unit="rows", disable=len(conversations) < TOKENIZE_PHASE_ROWS)]
    return {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}


def truncation(tokens: dict[str, list[list[int]]], max_length: int) -> dict[str, int]:
    """What cutting every row to `max_length` tokens does: rows cut, rows left with no loss token (the
    trainer drops or wastes them), loss tokens before and after, and the smallest max_length that keeps
    a loss token in 95% of the rows. A label at position i is predicted from position i - 1, so a row
    keeps its first loss token at any length above that token's position."""
    rows = len(tokens["input_ids"])
    truncated = sum(len(ids) > max_length for ids in tokens["input_ids"])
    firsts, no_loss, before, after = [], 0, 0, 0
    for labels in tokens["labels"]:
        on_loss = [i for i, x in enumerate(labels) if x != IGNORE and i > 0]
        before += len(on_loss)
        kept = sum(1 for i in on_loss if i < max_length)
        after += kept
        no_loss += kept == 0
        firsts.append(on_loss[0] + 1 if on_loss else 0)
    firsts.sort()
    needed = firsts[min(len(firsts) - 1, -(-95 * len(firsts) // 100) - 1)] if firsts else 0
    return {"rows": rows, "truncated": truncated, "no_loss_tokens": no_loss, "loss_tokens_before": before,
            "loss_tokens": after, "max_length_for_95pct": needed}


def check_truncation(report: dict[str, int], max_length: int, key: str = "data.max_length") -> None:
    """Stop when more than half the rows would lose every loss token to truncation."""
    if report["no_loss_tokens"] * 2 > report["rows"]:
        raise DsftError(f"{key} {max_length}: {report['no_loss_tokens']} of {report['rows']} rows lose every loss token "
                        f"after truncation; set {key} to at least {report['max_length_for_95pct']} (keeps 95% of them)")


# dsft.data.preference's prompt fitting as it was (dsft now fits prompts inside tokenize_answers)

from dataclasses import dataclass  # noqa: E402


@dataclass
class Pairs:
    rows: list
    truncated: int = 0
    dropped: int = 0


def fit_prompts(pairs: list, tokenizer: Any, max_prompt_length: int, overflow: str) -> Pairs:
    """Enforce `max_prompt_length` (tokens of the rendered prompt with its generation prompt)."""
    from dsft.data.preference import _truncate

    out = Pairs([])
    for pair in pairs:
        length = prompt_tokens(tokenizer, pair["prompt"])
        if length <= max_prompt_length:
            out.rows.append(pair)
        elif overflow == "drop":
            out.dropped += 1
        else:
            out.rows.append({**pair, "prompt": _truncate(tokenizer, pair["prompt"], max_prompt_length)})
            out.truncated += 1
    return out


def prompt_tokens(tokenizer: Any, prompt: list) -> int:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
