"""The recipe's `data:` section: files or Hub datasets, their format and chat rendering, mixes of several
files (weights as sampling shares, per-file formats and column maps). No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from dsft.config.base import PositiveInt, Section, checking_files, expand_path
from dsft.config.registry import FORMATS
from dsft.data import MAX_MIX_ROWS
from dsft.errors import shown

class DataSection(Section):
    """Training data: files, their format, and how they become token sequences."""

    train: list[str] = Field(description="JSONL, Parquet or CSV files (a single path or a list). An entry may be a "
                             "mapping `{path: FILE, ...}` with: `weight: W`, the file's share of the mix's weighted rows "
                             "(files given weights share the rows they hold together: weights 3 and 1 give a 3:1 split of "
                             "it; sft), or `rows: N` (exactly N rows from the file; sft); `format: F`, the file's own "
                             "data.format (sft mixes of messages, sharegpt, alpaca... files); `columns: {FIELD: COLUMN}`, "
                             "the file's column that holds each field dsft reads (e.g. `{completion: response, label: "
                             "feedback}`; every objective).")
    mix: list[dict[str, Any] | None] | None = Field(
        None, exclude=True, description="Set by data.train's `{path, ...}` entries, one per file (not a key to write).")
    sources: dict[str, dict[str, Any]] | None = Field(
        None, exclude=True, description="Set by dsft: the Hub dataset, split and commit each resolved file came from.")
    eval: list[str] = Field(default_factory=list, description="Held-out files in the same format (optional).")
    format: str = Field(
        "messages",
        description="`messages` (chat turns), `prompt_completion` (`prompt`/`completion`), `alpaca` "
        "(`instruction`/`input`/`output`), `sharegpt` (`conversations` of `from`/`value`: human, gpt, system), `preference` (`prompt`/`chosen`/`rejected`: dpo, orpo, simpo, kto), "
        "`kto` (`prompt` or `messages`, `completion`, `label`: kto), `prompt` (`prompt` or `messages` ending in a user "
        "turn, other columns passed to the rewards: grpo), or a format an objective plug-in adds.",
    )
    max_length: PositiveInt = Field(1024, description="Sequences are truncated (or packed) to this many tokens.")
    packing: bool = Field(False, description="Pack several examples into each sequence (best with flash attention).")
    assistant_only_loss: bool = Field(True, description="Compute the loss on assistant tokens only.")
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    chat_template: str | None = Field(
        None, description="A Jinja chat-template file to use instead of the tokenizer's own (saved with the run)."
    )
    num_proc: PositiveInt | None = Field(
        None, description="Processes that tokenize data the prepared-data cache does not hold yet (default: the "
        "machine's cores; inputs under 8 MiB are tokenized in one). Does not change the tokens."
    )

    def shares(self) -> list[dict[str, Any] | None] | None:
        """Per training file its share of a mix ({weight} or {rows}), or None when no file has one."""
        out = [{k: v for k, v in (m or {}).items() if k in ("weight", "rows")} or None for m in (self.mix or [])]
        return out if any(out) else None

    def file_formats(self) -> list[str]:
        """Per training file the data.format its rows are in (its entry's `format`, else data.format)."""
        return [(m or {}).get("format") or self.format for m in (self.mix or [None] * len(self.train))]

    def file_columns(self) -> list[dict[str, str] | None]:
        """Per training file its column map (`columns`), or None."""
        return [(m or {}).get("columns") for m in (self.mix or [None] * len(self.train))]

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"must be one of {', '.join(repr(f) for f in FORMATS)} (got {shown(v)})")
        return v

    @model_validator(mode="before")
    @classmethod
    def _mix_entries(cls, data: Any) -> Any:
        """`{path, weight | rows, format, columns}` entries of data.train: the path stays in train, the rest in mix."""
        if not isinstance(data, dict):
            return data
        for key in ("mix", "sources"):
            if key in data:
                raise ValueError(f"{key}: not a key to write; give a file's share, format or columns in its data.train "
                                 "entry {path: FILE, weight: W}")
        data = {**data, **{split: _hub_strings(data[split], split) for split in ("train", "eval") if split in data}}
        train = data.get("train")
        if not isinstance(train, list) or not any(isinstance(e, dict) for e in train):
            return data
        paths, mix = [], []
        for i, entry in enumerate(train):
            if not isinstance(entry, dict):
                paths.append(entry)
                mix.append(None)
                continue
            paths.append(_hub_entry(entry, f"train[{i}]") if "hub" in entry else entry.get("path"))
            mix.append(_train_entry({k: v for k, v in entry.items() if k not in HUB_KEYS} | {"path": paths[-1]}, i))
        return {**data, "train": paths, "mix": mix}

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        return [expand_path(p) if isinstance(p, str) else p for p in v] if isinstance(v, list) else v

    @field_validator("train")
    @classmethod
    def _train_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one training file")
        return v

    @field_validator("train", "eval")
    @classmethod
    def _files_exist(cls, v: list[str], info: ValidationInfo) -> list[str]:
        from dsft.hub import SCHEME

        if checking_files(info):
            missing = [p for p in v if not p.startswith(SCHEME) and not Path(p).is_file()]
            if missing:
                raise ValueError(f"file not found: {', '.join(missing)} (paths are relative to the current directory)")
        return v

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        v = expand_path(v) if v is not None else v
        if v is not None and checking_files(info) and not Path(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v


ENTRY_KEYS = ("path", "weight", "rows", "format", "columns")
HUB_KEYS = ("hub", "split", "name", "revision")


def _hub_entry(entry: dict, where: str) -> str:
    """A `{hub: OWNER/NAME, split, name, revision}` entry as its data_uri string (resolved in the preflight)."""
    from dsft.hub import REPO_ID, data_uri

    if "path" in entry:
        raise ValueError(f"{where}: give path (a local file) or hub (a Hugging Face dataset id), not both")
    repo = entry.get("hub")
    if not isinstance(repo, str) or not REPO_ID.match(repo):
        raise ValueError(f"{where}.hub: a Hugging Face dataset id OWNER/NAME (got {shown(repo)})")
    for key in ("split", "name", "revision"):
        if key in entry and (not isinstance(entry[key], str) or not entry[key].strip()):
            raise ValueError(f"{where}.{key}: a non-empty string (got {shown(entry[key])}), or leave it out")
    return data_uri(repo, entry.get("split"), entry.get("name"), entry.get("revision"))


def _hub_strings(value: Any, split: str) -> Any:
    """data.train / data.eval with every Hub id (`OWNER/NAME` that is no local file, or a `{hub: ...}` entry of
    data.eval) as its data_uri string."""
    from dsft.hub import data_uri, is_repo_id

    items = value if isinstance(value, list) else [value] if isinstance(value, str) else None
    if items is None:
        return value
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and is_repo_id(expand_path(item)):
            out.append(data_uri(item))
        elif split == "eval" and isinstance(item, dict) and "hub" in item:
            extra = sorted(set(map(str, item)) - set(HUB_KEYS))
            if extra:
                raise ValueError(f"eval[{i}]: a Hub entry of data.eval is {{hub, split, name, revision}} (unknown key "
                                 f"{extra[0]!r})")
            out.append(_hub_entry(item, f"eval[{i}]"))
        else:
            out.append(item)
    return out


def _train_entry(entry: dict, i: int) -> dict[str, Any]:
    """One `{path, ...}` entry of data.train as its mix record ({weight | rows, format, columns}), or the line
    saying what is wrong with it."""
    extra = sorted(set(map(str, entry)) - set(ENTRY_KEYS))
    if extra or "path" not in entry or not isinstance(entry["path"], str):
        raise ValueError(f"train[{i}]: an entry is {{path: FILE}} or {{hub: OWNER/NAME, split, name, revision}} with "
                         "any of weight, rows, format, columns"
                         + (f" (unknown key {extra[0]!r})" if extra else " (path missing)" if "path" not in entry else ""))
    if "weight" in entry and "rows" in entry:
        raise ValueError(f"train[{i}]: give weight (a share of the mix) or rows (a count), not both")
    record: dict[str, Any] = {}
    w = entry.get("weight")
    if "weight" in entry:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf"):
            raise ValueError(f"train[{i}].weight: a positive number (got {shown(w)}); weights 3 and 1 give the files a "
                             "3:1 share of the mix")
        record["weight"] = float(w)
    n = entry.get("rows")
    if "rows" in entry:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_MIX_ROWS:
            raise ValueError(f"train[{i}].rows: a whole number of rows from 1 to {MAX_MIX_ROWS:,} (got {shown(n)})")
        record["rows"] = n
    if "format" in entry:
        if entry["format"] not in FORMATS:
            raise ValueError(f"train[{i}].format: must be one of {', '.join(repr(f) for f in FORMATS)} (got "
                             f"{shown(entry['format'])})")
        record["format"] = entry["format"]
    if "columns" in entry:
        columns = entry["columns"]
        if not isinstance(columns, dict) or not columns or not all(
                isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() for k, v in columns.items()):
            raise ValueError(f"train[{i}].columns: a mapping of the fields dsft reads to this file's columns, e.g. "
                             f"{{completion: response, label: feedback}} (got {shown(columns)})")
        if len(set(columns.values())) != len(columns):
            raise ValueError(f"train[{i}].columns: one column given for two fields ({shown(columns)})")
        record["columns"] = dict(columns)
    return record
