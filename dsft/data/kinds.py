"""The kinds of prepared entry, one class each: how a file's rows are read and checked for the kind, how a chunk
of them is tokenized into the entry's columns, and which columns hold what (dsft.data.prepared.Tokens reads
them through `KINDS[entry.kind]`). A kind not in the table is an error, never another kind."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dsft.data.keys import Spec

IGNORE = -100


class Kind:
    """One kind of entry. `answer`: the column of the answer tokens after `prompt_ids` (dpo, kto), None where
    the rows are conversations or prompts alone; `prompt_first`: the rows have a `prompt_length`, kept while the
    prompt fits max_length; `prompts_only`: the rows are prompts the model completes (every prompt token
    profiled)."""

    name = ""
    answer: str | None = None
    prompt_first = False
    prompts_only = False

    def rows(self, spec: Spec, name: str, fmt: str, columns: dict[str, str] | None, errors: list[str]) -> Iterator[Any]:
        raise NotImplementedError

    def encode(self, tokenizer: Any, spec: Spec, rows: list[Any]) -> dict[str, Any]:
        """One chunk of rows tokenized: numpy arrays (a record batch's columns; a list column as (offsets,
        values)), and plain integers the entry's metadata sums up (`counts`)."""
        raise NotImplementedError


class Conversations(Kind):
    """`sft`: conversations -> input_ids and loss_mask (the assistant tokens, dsft.data.tokenize)."""

    name = "sft"

    def rows(self, spec, name, fmt, columns, errors):
        from dsft.data.formats import checked_rows, to_messages

        return checked_rows([name], lambda row: to_messages(row, fmt, spec.system_prompt), errors, fmt=fmt, columns=columns)

    def encode(self, tokenizer, spec, rows):
        from dsft.data.tokenize import tokenize_batch

        return conversation_columns(tokenize_batch(tokenizer, rows, None, spec.assistant_only))


class PairRows(Kind):
    """What reads preference pairs (to_pair), for the kinds that store them."""

    def rows(self, spec, name, fmt, columns, errors):
        from dsft.data.formats import checked_rows
        from dsft.data.preference import to_pair

        return checked_rows([name], lambda row: to_pair(row, spec.system_prompt), errors, "preference pairs", fmt=fmt,
                            columns=columns)


class ScoredPairs(PairRows):
    """`pairs`: preference pairs `dsft eval` scores -> the chosen conversation's input_ids / loss_mask and the
    rejected one's rejected_ids / rejected_mask."""

    name = "pairs"

    def encode(self, tokenizer, spec, rows):
        from dsft.data.tokenize import list_column, tokenize_batch

        chosen = tokenize_batch(tokenizer, [p["prompt"] + p["chosen"] for p in rows], None, True)
        rejected = tokenize_batch(tokenizer, [p["prompt"] + p["rejected"] for p in rows], None, True)
        columns = conversation_columns(chosen)
        columns["rejected_ids"] = list_column([ids for ids, _ in rejected], np.int32)
        columns["rejected_mask"] = list_column([mask for _, mask in rejected], np.bool_)
        columns["rejected_length"] = np.asarray([len(ids) for ids, _ in rejected], dtype=np.int32)
        return columns


class TrainingPairs(PairRows):
    """`dpo`: preference pairs as TRL's DPOTrainer tokenizes them -> prompt_ids, chosen_ids, rejected_ids (the
    prompt fitted first, dsft.data.preference); DPO, ORPO and SimPO train on these."""

    name, answer, prompt_first = "dpo", "chosen_ids", True

    def encode(self, tokenizer, spec, rows):
        from dsft.data.preference import tokenize_answers

        return tokenize_answers(tokenizer, rows, ("chosen", "rejected"), **(spec.fit or {}),
                                limit_key=spec.setting("max_prompt_length"))


class Unpaired(Kind):
    """`kto`: judged completions (KTO's rows, or preference pairs split in two) -> prompt_ids, completion_ids,
    label, with the desirable / undesirable counts."""

    name, answer, prompt_first = "kto", "completion_ids", True

    def rows(self, spec, name, fmt, columns, errors):
        from dsft.data.formats import checked_rows
        from dsft.data.preference import to_unpaired

        rows = checked_rows([name], lambda row: to_unpaired(row, spec.system_prompt), errors, "judged completions", fmt=fmt,
                            columns=columns)
        return (unpaired for pair in rows for unpaired in pair)

    def encode(self, tokenizer, spec, rows):
        from dsft.data.preference import tokenize_answers

        columns = tokenize_answers(tokenizer, rows, ("completion",), **(spec.fit or {}),
                                   limit_key=spec.setting("max_prompt_length"))
        desirable = int(columns["label"].sum()) if "label" in columns else 0
        return {**columns, "desirable": desirable, "undesirable": len(columns["prompt_length"]) - desirable}


class Prompts(Kind):
    """`prompt`: prompts the model completes itself (GRPO) -> prompt_ids, the fitted prompt and the row's other
    fields as JSON text, its FILE:LINE (dsft.data.prompts)."""

    name, prompt_first, prompts_only = "prompt", True, True

    def rows(self, spec, name, fmt, columns, errors):
        from dsft.data.formats import checked_rows
        from dsft.data.prompts import to_prompt

        return checked_rows([name], lambda row: to_prompt(row, spec.system_prompt), errors, "prompts", locate=True, fmt=fmt,
                            columns=columns)

    def encode(self, tokenizer, spec, rows):
        from dsft.data.prompts import tokenize_prompts

        return tokenize_prompts(tokenizer, rows, files=spec.files, **(spec.fit or {}))


KINDS: dict[str, Kind] = {k.name: k for k in (Conversations(), ScoredPairs(), TrainingPairs(), Unpaired(), Prompts())}
PROMPTS = Prompts.name


def kind_of(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown prepared-data kind {name!r}; known: {', '.join(KINDS)}")
    return KINDS[name]


def encode_rows(tokenizer: Any, spec: Spec, rows: list[Any]) -> dict[str, Any]:
    """One chunk of rows tokenized for the spec's kind (Kind.encode)."""
    return kind_of(spec.kind).encode(tokenizer, spec, rows)


def conversation_columns(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Conversations' columns: ids, loss mask, and the per-row length, first mask / loss position and loss count."""
    from dsft.data.tokenize import list_column

    first_mask, first_loss, loss_count = [], [], []
    for _, mask in rows:
        hits = np.flatnonzero(mask)
        first_mask.append(int(hits[0]) if len(hits) else -1)
        later = hits[hits > 0]
        first_loss.append(int(later[0]) if len(later) else -1)
        loss_count.append(len(later))
    return {"input_ids": list_column([ids for ids, _ in rows], np.int32), "loss_mask": list_column([m for _, m in rows], np.bool_),
            "length": np.asarray([len(ids) for ids, _ in rows], dtype=np.int32),
            "first_mask": np.asarray(first_mask, dtype=np.int32), "first_loss": np.asarray(first_loss, dtype=np.int32),
            "loss_count": np.asarray(loss_count, dtype=np.int32)}
