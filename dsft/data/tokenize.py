"""Render conversations with the chat template and mark which tokens carry the loss.

DeepSeek's released templates have no `{% generation %}` markers, so TRL's assistant-only loss
cannot use them. dsft finds each assistant turn itself: it renders the conversation up to the turn
with the generation prompt, then up to the end of the turn; the text between the two renders is the
turn (content and end-of-sentence token). This works with any template whose renders of a
conversation's prefixes are prefixes of its full render, which dsft checks.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dsft.data.formats import Messages
from dsft.errors import DsftError

IGNORE = -100


def _render(tokenizer: Any, messages: Messages, template: str | None, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
    )


def assistant_spans(tokenizer: Any, messages: Messages, template: str | None = None,
                    text: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of every assistant turn in it. `text`: the conversation's
    full render when the caller has it (a last turn's end is then the text's end: one render fewer)."""
    text = _render(tokenizer, messages, template) if text is None else text
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, generation_prompt=True)
        through = text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], template)
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


def reasoning_turn(tokenizer: Any, messages: Messages, template: str | None = None,
                   text: str | None = None) -> tuple[str, int] | None:
    """For a final assistant turn with a reasoning trace that the template drops (DeepSeek-R1-Distill's
    templates apply `content.split('</think>')[-1]` to every assistant turn, the last one included): the
    training text and where the trained part starts. The text is the conversation so far rendered with the
    generation prompt, then the raw reasoning, `</think>`, the answer and EOS; an opening `<think>` the
    prompt already ends with (newer template revisions) is not repeated, and the rendered prompt's BOS is
    the only one. None when the template keeps the turn as written (`text`: the full render, if known)."""
    last = messages[-1]
    if last["role"] != "assistant" or THINK_END not in last["content"]:
        return None
    if last["content"] in (_render(tokenizer, messages, template) if text is None else text):
        return None
    prompt = _render(tokenizer, messages[:-1], template, generation_prompt=True)
    content = last["content"]
    for opening in ("<think>\n", "<think>"):
        if prompt.endswith(opening) and content.startswith(opening):
            content = content[len(opening):]
            break
    return prompt + content + (tokenizer.eos_token or ""), len(prompt)


def training_text(tokenizer: Any, messages: Messages, template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """What a conversation trains on: its text and the character spans of the assistant turns. A final turn
    whose reasoning the template would drop is trained on as written (`reasoning_turn`)."""
    full = _render(tokenizer, messages, template)
    reasoning = reasoning_turn(tokenizer, messages, template, text=full)
    if reasoning is None:
        return assistant_spans(tokenizer, messages, template, text=full)
    text, start = reasoning
    spans = assistant_spans(tokenizer, messages[:-1], template)[1] if len(messages) > 1 else []
    return text, [*spans, (start, len(text))]


class Encoded:
    """One text's token ids and where its tokens start: a fast tokenizer's Encoding (looked up token by token,
    never converted whole), or a slow tokenizer's offsets."""

    def __init__(self, ids: list[int], encoding: Any = None, offsets: list[tuple[int, int]] | None = None) -> None:
        self.ids, self.encoding, self.offsets = ids, encoding, offsets

    def first_at(self, pos: int, text_length: int) -> int:
        """The index of the first token starting at or after character `pos` (tokens are in text order)."""
        if pos >= text_length:
            return len(self.ids)
        if self.encoding is not None:
            i = self.encoding.char_to_token(pos)
            if i is not None:
                return i if self.encoding.token_to_chars(i)[0] >= pos else i + 1
            self.offsets = self.encoding.offsets  # a character no token covers: search all starts
        starts = np.asarray(self.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
        return int(np.searchsorted(starts, pos, side="left"))


def encode(tokenizer: Any, texts: list[str]) -> list[Encoded]:
    """Each text tokenized without special tokens, in one batched call of the fast tokenizer's backend (what
    `tokenizer(text, add_special_tokens=False)` computes, without its per-call Python wrapping); a slow
    tokenizer is called per text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [Encoded(e.ids, encoding=e) for e in backend.encode_batch(texts, add_special_tokens=False)]
    out = []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        out.append(Encoded(enc["input_ids"], offsets=enc["offset_mapping"]))
    return out


def loss_mask(encoded: Encoded, spans: list[tuple[int, int]], text_length: int) -> np.ndarray:
    """True for every token whose first character lies in an assistant span. Tokens are in text order, so
    a span is one contiguous run of them: its two ends are looked up, no token is visited."""
    mask = np.zeros(len(encoded.ids), dtype=bool)
    for lo, hi in spans:
        mask[encoded.first_at(lo, text_length):encoded.first_at(hi, text_length)] = True
    return mask


def tokenize_batch(tokenizer: Any, conversations: list[Messages], template: str | None = None,
                   assistant_only: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """The one definition of what a conversation trains on: per conversation, its token ids (int32) and its
    loss mask (True on assistant tokens; everywhere without `assistant_only`). Each conversation is rendered
    once plus once per assistant turn's prompt, and all are tokenized in one batch."""
    texts, spans = zip(*(training_text(tokenizer, m, template) for m in conversations)) if conversations else ((), ())
    out = []
    for encoded, text, row_spans in zip(encode(tokenizer, list(texts)), texts, spans):
        ids = np.asarray(encoded.ids, dtype=np.int32)
        mask = loss_mask(encoded, row_spans, len(text)) if assistant_only else np.ones(len(ids), dtype=bool)
        out.append((ids, mask))
    return out


def list_column(rows: list[np.ndarray], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of an Arrow list column holding `rows` (dsft.data.prepared writes them)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(rows).astype(dtype, copy=False) if rows else np.zeros(0, dtype=dtype)
    return offsets, values


def labels_of(ids: np.ndarray, mask: np.ndarray) -> list[int]:
    """Labels as the trainer takes them: the token where the loss is on, IGNORE elsewhere."""
    return np.where(mask, ids, IGNORE).tolist()


def tokenize_conversation(
    tokenizer: Any, messages: Messages, template: str | None = None, assistant_only: bool = True
) -> dict[str, list[int]]:
    """`input_ids` and `labels` (IGNORE outside assistant turns when `assistant_only`) of one conversation."""
    ids, mask = tokenize_batch(tokenizer, [messages], template, assistant_only)[0]
    return {"input_ids": ids.tolist(), "labels": labels_of(ids, mask)}


def check_truncation(report: dict[str, int], max_length: int, key: str = "data.max_length") -> None:
    """Stop when more than half the rows would lose every loss token to truncation."""
    if report["no_loss_tokens"] * 2 > report["rows"]:
        raise DsftError(f"{key} {max_length}: {report['no_loss_tokens']} of {report['rows']} rows lose every loss token "
                        f"after truncation; set {key} to at least {report['max_length_for_95pct']} (keeps 95% of them)")
