"""A merge's unfinished output, kept so that running the same command again continues it.

Shards are written into `.OUT.dsft-partial` next to `--out` (each as NAME.part, renamed when whole) and
recorded in its progress file with their sha256. A later merge of the same base, adapter and options
(the fingerprint: their files' sizes and modification times) skips the recorded shards; any other
merge into the same `--out` starts the directory afresh. A file lock keeps two merges out of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dsft.locks import LOCK_NAME, OutputLock
from dsft.outputs import clear_dir, partial_dir, replace_dir, write_atomic

PROGRESS = "dsft-merge-progress.json"
LOCK = LOCK_NAME  # the same lock as every staged output: a merge and an export into one --out exclude each other


def fingerprint(files: list[Path], **options: Any) -> dict[str, Any]:
    """What the output depends on: every input file's size and mtime, and the merge options."""
    stats = {}
    for f in sorted(files):
        st = f.stat()
        stats[str(f.resolve())] = [st.st_size, st.st_mtime_ns]
    return {"files": stats, **options}


class PartialOutput:
    """`recheck`: the caller's check of `--out`, run again under the lock (another merge may have finished
    there since it was first checked)."""

    def __init__(self, out: Path, key: dict[str, Any], recheck: Any = None) -> None:
        self.out, self.key, self.recheck = out, key, recheck
        self.dir = partial_dir(out)
        self.done: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> "PartialOutput":
        self._lock = OutputLock(self.dir, "--out", LOCK, busy=f"--out {self.out}: another dsft process is writing it; "
                                "wait for that one or choose another --out").__enter__()
        if self.recheck is not None:
            try:
                self.recheck()
            except BaseException as e:
                self.__exit__(type(e), e, None)
                raise
        state = self._read()
        if state.get("fingerprint") == self.key:
            self.done = {n: d for n, d in state["done"].items() if (self.dir / n).is_file()}
        else:
            self._clear()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / PROGRESS).read_text())
        except (OSError, ValueError):
            return {}

    def _clear(self) -> None:
        clear_dir(self.dir, keep=(LOCK,))

    def part(self, name: str) -> Path:
        return self.dir / f"{name}.part"

    def record(self, name: str, **info: Any) -> None:
        """The shard's NAME.part is whole: rename it and note it (atomically) as done."""
        os.replace(self.part(name), self.dir / name)
        self.done[name] = info
        write_atomic(self.dir / PROGRESS, json.dumps({"fingerprint": self.key, "done": self.done}, indent=2) + "\n")

    def finish(self) -> None:
        """Move the finished output to `--out` (replacing it: the caller checked --force). Until the rename
        succeeds the progress file stays, so a failed rename is continued by the same command, not redone."""
        replace_dir(self.dir, self.out)
        (self.out / PROGRESS).unlink(missing_ok=True)
        (self.out / LOCK).unlink(missing_ok=True)
