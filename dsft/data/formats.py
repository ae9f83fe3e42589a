"""Read training files and turn every row, whatever its format, into chat messages.

Every problem is reported as `FILE:LINE: what is wrong` (`FILE:row N` for Parquet), all at once.
No torch, no tokenizer: this runs in preflight before anything heavy is loaded.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsft.errors import DsftError

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20


class RowError(ValueError):
    """A row that cannot be used; the message says what is wrong with it."""


def iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) pairs; a location is `FILE:LINE` or `FILE:row N`."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _jsonl(path)
    elif suffix == ".csv":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the first column's name
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DsftError(f"{path}:{line}: {_not_utf8(e)}") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            yield f"{path}:{reader.line_num}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise DsftError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]}); "
                            "re-export it or use JSONL") from None
        for i, row in enumerate(rows, start=1):
            yield f"{path}:row {i}", row
    else:
        raise DsftError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet")


def surrogate_field(value: Any, where: str = "the row") -> str | None:
    """Where in a decoded JSON value a string holds a lone UTF-16 surrogate (JSON's `\\ud800` escape without
    its pair decodes to one, and no tokenizer or file can take it), or None."""
    stack = [(where, value)]
    while stack:
        at, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return at
        elif isinstance(v, dict):
            stack += [(f"field {k!r}" if at == where else f"{at}.{k}", x) for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(f"{at}[{i}]", x) for i, x in enumerate(v)]
    return None


def _not_utf8(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte {e.object[e.start]:#04x}); save the file as UTF-8"


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{n}", RowError(_not_utf8(e))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", RowError(f"not valid JSON ({e.msg} at column {e.colno}); fix or remove the line")
                continue
            except RecursionError:
                yield f"{path}:{n}", RowError("nested too deeply to read (JSON arrays or objects over ~1000 levels deep); "
                                              "a row is an object of text fields")
                continue
            bad = surrogate_field(row) if "\\u" in line else None
            yield f"{path}:{n}", RowError(f"{bad}: holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                                          "pair), which is not text; fix the escape") if bad else row


def _text(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise RowError(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _check_messages(messages: Any) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RowError(f"messages[{i}] needs a role of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise RowError(f"messages[{i}] ({m['role']}) has empty or non-string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant message: nothing to learn from this row")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def to_messages(row: Any, fmt: str, system_prompt: str | None = None) -> Messages:
    """One row of `fmt` as chat messages; raises RowError if the row does not fit the format."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(f"a row must be an object, got {type(row).__name__}")
    if fmt == "messages":
        if "messages" not in row:
            raise RowError("missing field 'messages' (data.format is messages)")
        messages = _check_messages(row["messages"])
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text(row, "prompt")}, {"role": "assistant", "content": _text(row, "completion")}]
    elif fmt == "alpaca":
        instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def row_format(row: Any) -> str:
    """The format a row is written in, from its keys: `preference` (chosen and rejected), `messages`,
    `alpaca` (instruction), `prompt_completion`; `messages` when none matches (its error then names the
    missing key)."""
    if isinstance(row, dict):
        if "chosen" in row and "rejected" in row:
            return "preference"
        if "messages" in row:
            return "messages"
        if "instruction" in row:
            return "alpaca"
        if "prompt" in row and "completion" in row:
            return "prompt_completion"
    return "messages"


def load_conversations(paths: list[str], fmt: str, system_prompt: str | None = None) -> list[Messages]:
    """All rows of all files as messages, or a DsftError listing every bad row."""
    conversations: list[Messages] = []
    errors: list[str] = []
    for name in paths:
        path = Path(name)
        before = len(conversations)
        for where, row in iter_rows(path):
            try:
                conversations.append(to_messages(row, fmt, system_prompt))
            except RowError as e:
                errors.append(f"{where}: {e}")
        if len(conversations) == before and not any(err.startswith(f"{path}:") for err in errors):
            errors.append(f"{path}:1: the file has no rows; add examples or remove it from the recipe")
    if errors:
        shown = errors[:MAX_REPORTED]
        more = len(errors) - len(shown)
        raise DsftError(*shown, f"... and {more} more bad rows" if more else "")
    return conversations
