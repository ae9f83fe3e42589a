"""Read training files and turn every row, whatever its format, into chat messages.

Every problem is reported as `FILE:LINE: what is wrong` (`FILE:row N` for Parquet), all at once.
No torch, no tokenizer: this runs in preflight before anything heavy is loaded.
"""

from __future__ import annotations

import csv
import re
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dsft.errors import DsftError

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
CONVERSATION_FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt")  # rows that are conversations
# ShareGPT's speakers (`from`), as Axolotl and LLaMA-Factory read them
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bard": "assistant", "bing": "assistant"}
MAX_REPORTED = 20


class RowError(ValueError):
    """A row that cannot be used; the message says what is wrong with it."""


def iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) pairs; a location is `FILE:LINE` or `FILE:row N`."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _jsonl(path)
    elif suffix == ".csv":
        reader = csv.DictReader(_text_lines(path))
        for row in reader:
            yield f"{path}:{reader.line_num}", row
    elif suffix == ".parquet":
        yield from _parquet(path)
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


def _text_lines(path: Path) -> Iterator[str]:
    """A text file's lines, read and decoded one at a time (a big file is never all in memory); a line that
    is not UTF-8 stops with its line number. A byte-order mark is not part of the first line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DsftError(f"{path}:{n}: {_not_utf8(e)}") from None


def _parquet(path: Path, batch: int = 1024) -> Iterator[tuple[str, Any]]:
    """A Parquet file's rows, a record batch at a time."""
    import pyarrow.parquet as pq

    def unreadable(e: Exception) -> DsftError:
        return DsftError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]}); re-export it or use JSONL")

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch)
        n = 0
        for record_batch in batches:
            for row in record_batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", row
    except DsftError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise unreadable(e) from None


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
                yield f"{path}:{n}", RowError(f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); fix or remove the line")
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
            raise RowError(f"missing field {key!r}" if key not in row else f"field {key!r} is empty")
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


# Conversation formats objective plug-ins add: format -> a function from a row (a dict) to chat messages,
# raising RowError for a row it cannot use. Their rows then go through the prepared-data cache like any other.
CONVERTERS: dict[str, Callable[[dict], Messages]] = {}
# formats whose rows hold no conversation to score a loss on (eval and the model card say why, per format)
UNSCORED = {"prompt": "prompts without answers", "kto": "completions judged one by one, not conversations to score"}


def register_converter(fmt: str, convert: Callable[[dict], Messages]) -> None:
    CONVERTERS[fmt] = convert


def unregister_converter(fmt: str) -> None:
    CONVERTERS.pop(fmt, None)


def to_messages(row: Any, fmt: str, system_prompt: str | None = None) -> Messages:
    """One row of `fmt` as chat messages; raises RowError if the row does not fit the format (naming the
    format its fields fit, when that is another)."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(f"a row must be an object, got {type(row).__name__}")
    try:
        return _to_messages(row, fmt, system_prompt)
    except RowError as e:
        other = row_format(row)
        if str(e).startswith("missing field") and other != fmt and fits(row, other):
            raise RowError(f"{e}; the row has the fields of {other}: set data.format: {other}") from None
        raise


def fits(row: dict, fmt: str) -> bool:
    """Whether a row has every field `fmt` requires."""
    return all(row.get(k) not in (None, "") for k in COLUMNS.get(fmt, (fmt,)))


# the fields (a CSV's columns) each row format needs; messages and sharegpt hold lists, which CSV cannot
COLUMNS = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
           "alpaca": ("instruction", "output"), "preference": ("prompt", "chosen", "rejected"),
           "kto": ("prompt", "completion", "label"), "prompt": ("prompt",)}
LISTS = ("messages", "sharegpt")


def header_problem(path: Path, fmt: str | None, columns: dict[str, str] | None = None) -> str | None:
    """A CSV file that cannot hold `fmt` rows, or whose header lacks the format's columns (after the file's
    column map): one line naming the columns found, the ones needed and the format they fit. None for other
    files and good headers."""
    if fmt is None or path.suffix.lower() != ".csv" or fmt not in COLUMNS:
        return None
    if fmt in LISTS:
        return (f"{path}: CSV cannot hold {fmt} rows (a list of turns per row); use JSONL or Parquet, or CSV columns "
                "of prompt_completion (prompt, completion) or alpaca (instruction, input, output)")
    header = next(csv.reader(_text_lines(path)), None)
    if not header:
        return None
    found = [h.strip() for h in header]
    mapped = {(columns or {}).get(c, c) for c in COLUMNS[fmt]}
    needed = [c for c in COLUMNS[fmt] if (columns or {}).get(c, c) not in found]
    if not needed or mapped <= set(found):
        return None
    if not needed:
        return None
    fit = next((f for f, cols in COLUMNS.items() if f not in LISTS and all(c in found for c in cols)), None)
    return (f"{path}:1: the header has columns {', '.join(found)}; data.format {fmt} needs "
            f"{', '.join(COLUMNS[fmt])} (missing {', '.join(needed)})"
            + (f"; these columns fit data.format {fit}" if fit else "; rename the columns or set data.format"))


def _to_messages(row: dict, fmt: str, system_prompt: str | None) -> Messages:
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
    elif fmt == "sharegpt":
        messages = _check_messages(_sharegpt(row))
    elif fmt in CONVERTERS:
        messages = _check_messages(CONVERTERS[fmt](row))
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _sharegpt(row: dict) -> Messages:
    """ShareGPT rows: `conversations` (or `messages`) of {from, value}, an optional `system` column."""
    turns = row.get("conversations", row.get("messages"))
    if turns is None:
        raise RowError("missing field 'conversations' (data.format is sharegpt: a list of {from, value} turns)")
    if not isinstance(turns, list) or not turns:
        raise RowError("field 'conversations' must be a non-empty list of {from, value} objects")
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn:
            raise RowError(f"conversations[{i}] needs a 'from' ({', '.join(SHAREGPT_ROLES)}) and a 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise RowError(f"conversations[{i}]: from {turn['from']!r} is not a speaker dsft knows "
                           f"({', '.join(SHAREGPT_ROLES)}); tool turns are not supported")
        messages.append({"role": role, "content": turn.get("value")})
    return messages


def row_format(row: Any) -> str:
    """The format a row is written in, from its keys: `preference` (chosen and rejected), `messages`,
    `sharegpt` (conversations), `alpaca` (instruction), `prompt_completion`; `messages` when none matches (its error then names the
    missing key)."""
    if isinstance(row, dict):
        if "chosen" in row and "rejected" in row:
            return "preference"
        if "conversations" in row:
            return "sharegpt"
        if "messages" in row:
            return "messages"
        if "instruction" in row:
            return "alpaca"
        if "prompt" in row and "completion" in row:
            return "prompt_completion"
    return "messages"


def renamed(row: Any, columns: dict[str, str] | None) -> Any:
    """A row with its columns renamed to the fields dsft reads (`columns`: {FIELD: COLUMN}, a data.train
    entry's map); a row holding both a field and the column mapped to it is refused (which one is meant?)."""
    if not columns or not isinstance(row, dict):
        return row
    out = dict(row)
    for field, column in columns.items():
        if column not in row:
            continue
        if field in row and field != column:
            raise RowError(f"has both field {field!r} and column {column!r}, which the file's columns map to {field!r}; "
                           "drop one, or the mapping")
        out[field] = out.pop(column)
    return out


MISSING = re.compile(r"^missing field '([^']+)'")


def _with_fields(error: RowError, row: Any, columns: dict[str, str] | None) -> RowError:
    """A missing-field error with the row's own fields and how to map one to the field (once: a format's own
    hint about another format it fits stays as it is)."""
    m = MISSING.match(str(error))
    if not m or not isinstance(row, dict) or "; the row has" in str(error) or not row:
        return error
    field = m.group(1)
    fields = ", ".join(sorted(map(str, row)))
    mapped = f" (mapped from column {columns[field]!r}, which this row lacks)" if columns and field in columns else ""
    return RowError(f"{error}{mapped}; this row's fields are {fields}: if one of them holds {field}, map it in the "
                    f"file's data.train entry: {{path: FILE, columns: {{{field}: COLUMN}}}}")


def checked_rows(paths: list[str], convert: Callable[[Any], Any], errors: list[str], what: str = "examples",
                 locate: bool = False, fmt: str | None = None, columns: dict[str, str] | None = None) -> Iterator[Any]:
    """Every row of every file converted by `convert` (to_messages, to_pair), read streaming, its columns
    first renamed by `columns` ({FIELD: COLUMN}); a row it refuses goes to `errors` as `FILE:LINE: why`
    (a missing field with the row's fields and how to map one), and so does a file with no rows. A CSV file
    whose header cannot hold `fmt` rows is one error for the file (header_problem). `locate`: each converted
    row (a dict) gets its `FILE:LINE` as `where`."""
    for name in paths:
        path, count, good = Path(name), len(errors), 0
        problem = header_problem(path, fmt, columns)
        if problem:
            errors.append(problem)
            continue
        for where, raw in iter_rows(path):
            try:
                row = renamed(raw, columns)
            except RowError as e:
                errors.append(f"{where}: {e}")
                continue
            try:
                converted = convert(row)
                if locate:
                    converted["where"] = where
                yield converted
                good += 1
            except RowError as e:
                errors.append(f"{where}: {_with_fields(e, row, columns)}")
        if not good and len(errors) == count:
            errors.append(f"{path}:1: the file has no rows; add {what} or remove it from the recipe")


def raise_row_errors(errors: list[str]) -> None:
    """The bad rows as one DsftError: the first MAX_REPORTED, then how many more."""
    if errors:
        more = len(errors) - MAX_REPORTED
        raise DsftError(*errors[:MAX_REPORTED], f"... and {more} more bad rows" if more > 0 else "")


def load_conversations(paths: list[str], fmt: str, system_prompt: str | None = None) -> list[Messages]:
    """All rows of all files as messages (small files: training data goes through dsft.data.prepared), or a
    DsftError listing every bad row."""
    errors: list[str] = []
    conversations = list(checked_rows(paths, lambda row: to_messages(row, fmt, system_prompt), errors, fmt=fmt))
    raise_row_errors(errors)
    return conversations
