"""Render conversations with the chat template and mark which tokens carry the loss.

DeepSeek's released templates have no `{% generation %}` markers, so TRL's assistant-only loss
cannot use them. dsft finds each assistant turn itself: it renders the conversation up to the turn
with the generation prompt, then up to the end of the turn; the text between the two renders is the
turn (content and end-of-sentence token). This works with any template whose renders of a
conversation's prefixes are prefixes of its full render, which dsft checks.
"""

from __future__ import annotations

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
        if not (through.startswith(before) and text.startswith(through)):
            raise DsftError(
                "chat template: rendering a conversation's first turns does not give a prefix of the whole "
                "render, so assistant tokens cannot be located; set data.assistant_only_loss: false or use a "
                "template that renders turns in order (data.chat_template)"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(
    tokenizer: Any, messages: Messages, template: str | None = None, assistant_only: bool = True
) -> dict[str, list[int]]:
    """`input_ids` and `labels` (IGNORE outside assistant turns when `assistant_only`)."""
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


def tokenize_all(
    tokenizer: Any, conversations: list[Messages], template: str | None, assistant_only: bool
) -> dict[str, list[list[int]]]:
    rows = [tokenize_conversation(tokenizer, m, template, assistant_only) for m in conversations]
    return {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
