"""Prepared data: every data file tokenized once, into a memory-mapped Arrow cache that every run, rank,
resume and command on the same data reuses.

An entry is one split (data.train or data.eval) of one kind (dsft.data.kinds, a class each):

- `sft`: conversations -> `input_ids` (int32) and `loss_mask` (bool: the assistant tokens, dsft.data.tokenize);
- `pairs`: preference pairs scored by `dsft eval` -> the chosen conversation's `input_ids` / `loss_mask` and
  the rejected one's `rejected_ids` / `rejected_mask`;
- `dpo`: preference pairs as TRL's DPOTrainer tokenizes them -> `prompt_ids`, `chosen_ids`, `rejected_ids`
  (the prompt fitted to the section's max_prompt_length first, dsft.data.preference); the pair objectives
  (DPO, ORPO, SimPO) all train on these;
- `kto`: unpaired rows (KTO's, or preference pairs split in two) as KTOTrainer tokenizes them ->
  `prompt_ids`, `completion_ids`, `label`;
- `prompt`: prompts the model completes itself (GRPO) -> `prompt_ids`, the fitted prompt and the row's other
  fields as JSON text, its FILE:LINE (dsft.data.prompts);

with small per-row columns (`length`, `first_mask`, `first_loss`, `loss_count`, `prompt_length`) from which
truncation reports and the rows a trainer keeps are computed for any max_length without reading tokens.

The key (dsft.data.keys: `Spec.key`) holds everything that decides the tokens: the kind, each file's sha256 in order, the
tokenizer (its backend's canonical JSON, special tokens and chat template), the data settings that change
tokens (format, system prompt, assistant-only loss; DPO's prompt fitting) and VERSION of these rules. A
fast path keys the same on each file's path, size, modification time and inode instead of its sha256, so a
warm start never hashes a multi-GB file; the sha256 recorded when the entry was built is re-checked by
`--resume` and `dsft cache verify`.

The cache is a writer like any other: an entry is built (dsft.data.build) in a temporary directory beside it, under a file
lock on its key (ranks of one run and concurrent runs: one builds, the others wait and map it), and renamed
into place; a damaged entry (a file missing or of another size, unreadable metadata) is moved aside with a
warning and built again, never trusted. Entries hold Arrow files and JSON only, never pickles.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dsft.data import MAX_MIX_ROWS
from dsft.data.build import build
from dsft.data.keys import SHA256, Spec, file_sha256, stat_of
from dsft.data.kinds import IGNORE, kind_of
from dsft.data.store import DATA, META, data_root, discard, entries, problem, view, write_meta
from dsft.errors import DsftError
from dsft.locks import exclusive
from dsft.outputs import cache_error, human_size



# ---------------------------------------------------------------- an entry

class Tokens:
    """A prepared split: the memory-mapped dataset and its metadata."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        from datasets import Dataset

        self.path, self.meta = path, meta
        self.dataset = Dataset.from_file(str(view(path)))  # what datasets derives goes to this process's view
        self.kind = meta["kind"]

    def __len__(self) -> int:
        return self.meta["rows"]

    @property
    def tokens(self) -> int:
        return self.meta["tokens"]

    def column(self, name: str) -> np.ndarray:
        """A per-row column (length, first_loss, ...) as a numpy array, straight from the memory map."""
        return self.dataset.data.column(name).to_numpy()

    # -- SFT-style rows (sft, pairs: the chosen conversation; dpo: prompt + chosen)

    def stats(self, max_length: int) -> dict[str, int]:
        """What cutting every row to `max_length` tokens does: rows cut, rows left with no loss token, loss
        tokens before and after, the smallest max_length keeping a loss token in 95% of the rows (a label at
        position i is predicted from i - 1, so position 0 never counts). Computed once per max_length (it
        reads the masks of the rows cut) and kept in the entry's metadata."""
        known = self.meta.get("stats", {}).get(str(max_length))
        if known is None:
            known = self._stats(max_length)
            self.meta.setdefault("stats", {})[str(max_length)] = known
            with contextlib.suppress(OSError):  # a read-only cache computes it each time
                write_meta(self.path, self.meta)
        return dict(known)

    def _stats(self, max_length: int) -> dict[str, int]:
        if kind_of(self.kind).prompt_first:
            lengths = self.column("length")
            return {"rows": len(self), "truncated": int((lengths > max_length).sum())}
        length, first_loss, loss_count = self.column("length"), self.column("first_loss"), self.column("loss_count")
        long_rows = np.flatnonzero(length > max_length)
        after = int(loss_count[length <= max_length].sum()) + int(self._loss_below(long_rows, max_length).sum())
        no_loss = int(((first_loss < 0) | (first_loss >= max_length)).sum())
        firsts = np.sort(np.where(first_loss >= 0, first_loss + 1, 0))
        needed = int(firsts[min(len(firsts) - 1, -(-95 * len(firsts) // 100) - 1)]) if len(firsts) else 0
        return {"rows": len(self), "truncated": len(long_rows), "no_loss_tokens": no_loss,
                "loss_tokens_before": int(loss_count.sum()), "loss_tokens": after, "max_length_for_95pct": needed}

    def _loss_below(self, rows: np.ndarray, max_length: int, block: int = 8192) -> np.ndarray:
        """Per row in `rows`: its loss tokens at positions 1 .. max_length - 1 (a block of rows at a time)."""
        import pyarrow.compute as pc

        column, rows = self._table().column("loss_mask"), self._positions(rows)
        out = np.zeros(len(rows), dtype=np.int64)
        for i in range(0, len(rows), block):
            taken = pc.list_slice(column.take(rows[i:i + block]), 1, max_length)
            flat = pc.list_flatten(taken).to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(taken).to_numpy()
            out[i:i + block] = np.bincount(parents[flat], minlength=len(rows[i:i + block]))
        return out

    def _table(self) -> Any:
        """The Arrow table the rows live in."""
        return self.dataset.data

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        """Rows of this split as positions in `_table()`."""
        return rows

    def trainable(self, max_length: int) -> Any:
        """The rows a trainer keeps at `max_length`: those with a loss token in their first max_length tokens
        (TRL's rule: a row left with none teaches nothing), or, for DPO, a prompt shorter than max_length."""
        if kind_of(self.kind).prompt_first:
            keep = self.column("prompt_length") < max_length
        else:
            first = self.column("first_mask")
            keep = (first >= 0) & (first < max_length)
        return self.dataset if keep.all() else self.dataset.select(np.flatnonzero(keep))

    def rows(self, indices: list[int] | np.ndarray, max_length: int | None = None) -> dict[str, list[list[int]]]:
        """Token ids and labels of some rows as Python lists (the routing profile, eval), each cut to
        `max_length` when given. DPO and KTO rows are prompt + (chosen) answer, the loss on the answer."""
        picked = self.dataset.select(indices)[:]
        kind = kind_of(self.kind)
        if kind.prompts_only:
            ids = labels = picked["prompt_ids"]
        elif kind.answer is not None:
            pairs = list(zip(picked["prompt_ids"], picked[kind.answer]))
            ids = [p + a for p, a in pairs]
            labels = [[IGNORE] * len(p) + a for p, a in pairs]
        else:
            ids = picked["input_ids"]
            labels = [[t if m else IGNORE for t, m in zip(row, mask)] for row, mask in zip(ids, picked["loss_mask"])]
        cut = slice(None, max_length)
        return {"input_ids": [r[cut] for r in ids], "labels": [r[cut] for r in labels]}

    def rejected(self, indices: list[int] | np.ndarray, max_length: int | None = None) -> dict[str, list[list[int]]]:
        """The rejected conversations of `pairs` rows, as `rows` gives the chosen ones."""
        picked = self.dataset.select(indices)[:]
        cut = slice(None, max_length)
        labels = [[t if m else IGNORE for t, m in zip(r, mask)] for r, mask in zip(picked["rejected_ids"], picked["rejected_mask"])]
        return {"input_ids": [r[cut] for r in picked["rejected_ids"]], "labels": [r[cut] for r in labels]}

    def distinct(self) -> np.ndarray:
        """The positions of rows that are not repeats of an earlier one (all of them, outside a mix)."""
        return np.arange(len(self))

    def sample(self, samples: int, seed: int, max_length: int | None = None) -> dict[str, list[list[int]]]:
        """A seeded sample of `samples` distinct rows (all of them when there are fewer; a row a mix repeats is
        one row), in their original order."""
        import random

        pool = self.distinct().tolist()
        keep = sorted(random.Random(seed).sample(pool, samples)) if samples < len(pool) else pool
        return self.rows(keep, max_length)

    def remember_hashes(self) -> None:
        """Seed file_sha256 with what this entry recorded for its files as they are now (same size, mtime)."""
        for record in self.meta.get("files", []):
            with contextlib.suppress(OSError):
                if list(stat_of(Path(record["path"]))) == record["stat"]:
                    SHA256[tuple(record["stat"])] = record["sha256"]


class Mixed(Tokens):
    """Several files' prepared tokens mixed by data.train's weights / row counts (`mix_counts`): a view on
    their entries (concatenated memory maps, an index of the rows taken); nothing is copied or cached."""

    def __init__(self, parts: list[Tokens], takes: list[np.ndarray], record: list[dict[str, Any]]) -> None:
        from datasets import concatenate_datasets

        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        self.parts, self.path, self.kind = parts, None, parts[0].kind
        self.index = np.concatenate([o + t for o, t in zip(offsets, takes)]).astype(np.int64)
        self.base = concatenate_datasets([p.dataset for p in parts])
        self.dataset = self.base.select(self.index)
        self._memo: dict[int, dict[str, int]] = {}
        self.meta = {"kind": self.kind, "rows": len(self.index), "mix": record,
                     "tokens": int(self.column("length").sum())}

    def column(self, name: str) -> np.ndarray:
        return np.concatenate([p.column(name) for p in self.parts])[self.index]

    def distinct(self) -> np.ndarray:
        return np.sort(np.unique(self.index, return_index=True)[1])

    def stats(self, max_length: int) -> dict[str, int]:
        if max_length not in self._memo:
            self._memo[max_length] = self._stats(max_length)
        return dict(self._memo[max_length])

    def _table(self) -> Any:
        return self.base.data

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        return self.index[rows]

    def remember_hashes(self) -> None:
        for p in self.parts:
            p.remember_hashes()


def mix_counts(sizes: list[int], shares: list[dict[str, float] | None], seed: int) -> list[np.ndarray]:
    """Per file, the rows taken (local indices): all of them (no share); `rows: N` exactly N; `weight: W` its
    share of the weighted rows: the files given weights hold R rows together, and a file of weight W takes
    round(R x W / the weights' sum) of them (at least 1), so weights 3 and 1 split R 3:1. Beyond a file's
    size its rows repeat whole, then a seeded sample of the rest; below it, a seeded sample. Sorted, so the
    same recipe and seed take the same rows. The total is checked by arithmetic before anything is allocated."""
    weighted = [i for i, s in enumerate(shares) if s and "weight" in s]
    pool = sum(sizes[i] for i in weighted)
    weights = sum(shares[i]["weight"] for i in weighted)
    wants = [n if not share else share["rows"] if "rows" in share else max(1, round(pool * share["weight"] / weights))
             for n, share in zip(sizes, shares)]
    if sum(wants) > MAX_MIX_ROWS:
        i = max(range(len(wants)), key=lambda k: wants[k])
        raise DsftError(f"data.train[{i}]: the mix would take {sum(wants):,} rows in all ({wants[i]:,} from this file of "
                        f"{sizes[i]:,}; an index of {human_size(8 * sum(wants))}); give shares that total at most "
                        f"{MAX_MIX_ROWS:,} rows")
    rng = np.random.default_rng(seed)
    takes = []
    for n, want in zip(sizes, wants):
        whole, rest = divmod(int(want), n)
        take = np.concatenate([np.tile(np.arange(n), whole), np.sort(rng.choice(n, rest, replace=False))])
        takes.append(np.sort(take))
    return takes


def prepare_mix(spec: Spec, shares: list[dict[str, float] | None] | None, seed: int, tokenizer: Any,
                num_proc: int | None = None) -> Tokens:
    """data.train prepared: one entry for all files, or, when data.train gives shares, one entry per file
    (each reused by any run of that file, in its own format and column map) mixed as `mix_counts` says."""
    import dataclasses

    if not shares:
        return prepare(spec, tokenizer, num_proc)
    parts = [prepare(dataclasses.replace(spec, files=[f], formats=[spec.file_format(i)], columns=[spec.file_columns(i)]),
                     tokenizer, num_proc) for i, f in enumerate(spec.files)]
    takes = mix_counts([len(p) for p in parts], shares, seed)
    total = sum(len(t) for t in takes)
    record = [{"path": str(Path(f).resolve()), "rows_in_file": len(p), "rows_used": len(t),
               "share": round(len(t) / total, 4), "format": spec.file_format(i), **(share or {})}
              for i, (f, p, t, share) in enumerate(zip(spec.files, parts, takes, shares))]
    return Mixed(parts, takes, record)


def _open(path: Path) -> Tokens | None:
    """The entry at `path`, or None when there is none or it is damaged or changed (reported, moved aside): its
    metadata's seal and its tokens' checksum are checked before anything in it is trusted (dsft.data.store)."""
    if not (path.is_dir() or path.is_symlink()):
        return None
    wrong = problem(path, full=True)
    if wrong is None:
        try:
            return Tokens(path, json.loads((path / META).read_text(encoding="utf-8")))
        except Exception as e:  # noqa: BLE001 - pyarrow / datasets raise several types for a damaged file
            wrong = f"{DATA} cannot be read ({str(e).splitlines()[0][:120]})"
    from dsft.console import say

    say(f"warning: the prepared-data cache entry {path} is damaged ({wrong}); building it again", stderr=True)
    discard(path)
    return None


def _find_stat(root: Path, stat_key: str) -> Path | None:
    for path in entries(root):
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            if stat_key in json.loads((path / META).read_text(encoding="utf-8")).get("stat_keys", []):
                return path
    return None


def prepare(spec: Spec, tokenizer: Any, num_proc: int | None = None, quiet: bool = False) -> Tokens:
    """The split's tokens from the cache, built first if no entry has them (see the module docstring)."""
    from dsft.console import say

    root = data_root()
    stat_key = spec.stat_key(tokenizer)
    found = _find_stat(root, stat_key)
    tokens = _open(found) if found is not None else None
    if tokens is None:
        key = spec.key(tokenizer)
        path = root / key[:20]
        tokens = _open(path)  # the same content reached another way: a hit, read-only caches included
        if tokens is not None and stat_key not in tokens.meta.get("stat_keys", []):
            tokens.meta["stat_keys"] = [*tokens.meta.get("stat_keys", []), stat_key][-16:]
            with contextlib.suppress(OSError):
                write_meta(path, tokens.meta)
    if tokens is None:
        try:
            with exclusive(root / f".{key[:20]}.lock", lambda: say("waiting for another dsft process preparing the "
                                                                  f"same data ({path})")):
                tokens = _open(path)  # another process may have built it while this one waited
                if tokens is None:
                    tokens = Tokens(path, build(spec, tokenizer, key, path, stat_key, num_proc or os.cpu_count() or 1, quiet))
                    tokens.remember_hashes()
                    return tokens
        except OSError as e:
            raise cache_error(f"cannot write {e.filename or path} ({e.strerror or e})") from None
    tokens.remember_hashes()
    if not quiet:
        say(f"{spec.what}: tokens from cache ({len(tokens):,} rows, {tokens.tokens:,} tokens; {tokens.path})")
    return tokens


# ---------------------------------------------------------------- the cache as a whole (dsft cache)

def verify(entry: Any) -> list[str]:
    """Problems of an entry (a dsft.data.store.Entry): any byte of its files changed since dsft wrote them, and
    source files that are gone or whose sha256 differs from the one recorded when the entry was built (the entry
    then holds another file's tokens: harmless, it is only found by that content's key, but it is stale)."""
    wrong = problem(entry.path, full=True)
    if wrong:
        return [wrong]
    problems = []
    for record in entry.files:
        path = Path(record["path"])
        if not path.is_file():
            problems.append(f"source {path} is gone")
        elif file_sha256(path) != record.get("sha256"):
            problems.append(f"source {path} changed since it was tokenized (sha256 differs)")
    try:
        Tokens(entry.path, entry.meta).dataset.data.validate(full=False)
    except Exception as e:  # noqa: BLE001
        problems.append(f"{DATA} cannot be read ({str(e)[:120]})")
    return problems
