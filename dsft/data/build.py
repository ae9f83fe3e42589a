"""Building a prepared entry: the split's rows read streaming file by file (bad rows reported as FILE:LINE),
tokenized in chunks (in worker processes for a large input), written as one Arrow stream into a temporary
directory with its sealed metadata, then renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dsft.data.keys import VERSION, Spec, file_sha256, stat_of
from dsft.data.kinds import encode_rows, kind_of
from dsft.data.store import CHECKSUM, DATA, FORMAT, checksum, write_meta
from dsft.errors import DsftError
from dsft.outputs import human_size

CHUNK = 1000  # rows tokenized in one batch (one task of a worker process)
PARALLEL_BYTES = 8 * 2**20  # smaller inputs are tokenized in this process: starting workers would cost more


def _rows(spec: Spec, errors: list[str]) -> Iterator[Any]:
    """The split's rows, file by file in its own format and column map, converted for its kind and read
    streaming; bad rows go to `errors` as FILE:LINE."""
    for i, name in enumerate(spec.files):
        yield from kind_of(spec.kind).rows(spec, name, spec.file_format(i), spec.file_columns(i), errors)


def _chunks(rows: Iterator[Any], errors: list[str]) -> Iterator[list[Any]]:
    """Batches of CHUNK good rows; once a bad row is seen the rest are only checked (their errors counted)."""
    chunk: list[Any] = []
    for row in rows:
        if errors:
            continue
        chunk.append(row)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk and not errors:
        yield chunk


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, spec: Spec) -> None:
    _WORKER.update(tokenizer=tokenizer, spec=spec)


def _work(rows: list[Any]) -> dict[str, Any]:
    return encode_rows(_WORKER["tokenizer"], _WORKER["spec"], rows)


def _record_batch(columns: dict[str, Any]) -> Any:
    import pyarrow as pa

    arrays, names = [], []
    for name, value in columns.items():
        if isinstance(value, tuple):
            offsets, values = value
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values)))
        elif isinstance(value, np.ndarray):
            arrays.append(pa.array(value))
        else:
            continue
        names.append(name)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _encoded(spec: Spec, tokenizer: Any, chunks: Iterator[list[Any]], num_proc: int) -> Iterator[dict[str, Any]]:
    """Each chunk's columns in order: in worker processes for a large input (at most two chunks in flight
    per worker, so the rows read ahead stay bounded), else here."""
    size = sum(Path(f).stat().st_size for f in spec.files)
    if num_proc <= 1 or size < PARALLEL_BYTES:
        for chunk in chunks:
            yield encode_rows(tokenizer, spec, chunk)
        return
    import multiprocessing as mp
    from collections import deque

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(num_proc, initializer=_init_worker, initargs=(tokenizer, spec)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_work, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _nothing_to_train_on(spec: Spec, counts: dict[str, int]) -> None:
    """Raise the error of an entry with no rows: every prompt too long (dropped), or no rows at all."""
    if kind_of(spec.kind).prompt_first and counts.get("dropped"):
        limit, overflow = spec.setting("max_prompt_length"), spec.setting("prompt_overflow")
        raise DsftError(f"{limit} {(spec.fit or {}).get('max_prompt_length')}: every prompt of {spec.what} is longer "
                        f"({counts['dropped']:,} rows dropped by {overflow}: drop); raise {limit}, or set {overflow}: "
                        "truncate")
    raise DsftError(f"{spec.what}: no rows to train on")


def build(spec: Spec, tokenizer: Any, key: str, path: Path, stat_key: str, num_proc: int, quiet: bool) -> dict[str, Any]:
    """The entry of `spec` built in a temporary directory beside `path` and renamed into place (the caller holds the
    key's lock); its metadata."""
    import pyarrow as pa

    from dsft.console import Phase, say

    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a killed builder's (we hold the key's lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    errors: list[str] = []
    rows = tokens = 0
    counts: dict[str, int] = {}
    started = time.monotonic()
    size = sum(Path(f).stat().st_size for f in spec.files)
    try:
        with Phase(f"tokenizing {spec.what}", None, "rows") if not quiet and size >= 2**20 else contextlib.nullcontext() as phase, \
                (tmp / DATA).open("wb") as sink:
            writer = None
            for columns in _encoded(spec, tokenizer, _chunks(_rows(spec, errors), errors), num_proc):
                batch = _record_batch(columns)
                # the key as datasets' fingerprint: what it derives from the entry (packed rows) is found again
                schema = batch.schema.with_metadata({b"huggingface": json.dumps({"fingerprint": key[:32]}).encode()})
                batch = batch.replace_schema_metadata(schema.metadata)
                writer = writer or pa.ipc.new_stream(sink, schema)
                writer.write_batch(batch)
                rows += batch.num_rows
                tokens += int(columns["length"].sum())
                for name, value in columns.items():
                    if isinstance(value, int):
                        counts[name] = counts.get(name, 0) + value
                if phase is not None:
                    phase.update(completed=rows)
            from dsft.data.formats import raise_row_errors

            raise_row_errors(errors)
            if writer is None or rows == 0:  # an entry of no rows is never cached
                _nothing_to_train_on(spec, counts)
            writer.close()
        files = [{"path": str(Path(f).resolve()), "sha256": file_sha256(Path(f)), "stat": list(stat_of(Path(f)))}
                 for f in spec.files]
        meta = {"format": FORMAT, "version": VERSION, "key": key, "stat_keys": [stat_key], "kind": spec.kind,
                "what": spec.what, "row_format": spec.fmt, "files": files, "rows": rows, "tokens": tokens,
                "bytes": (tmp / DATA).stat().st_size, CHECKSUM: checksum(tmp / DATA), "created": time.time(),
                "seconds": round(time.monotonic() - started, 2), "counts": counts}
        write_meta(tmp, meta)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        say(f"{spec.what}: tokenized {rows:,} rows ({tokens:,} tokens) in {time.monotonic() - started:.1f} s into the "
            f"cache ({human_size(meta['bytes'])}; {path})")
    return meta
