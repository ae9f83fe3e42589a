"""A merge's unfinished output, kept so that running the same command again continues it.

Shards are written into `.OUT.dsft-partial` next to `--out` (each as NAME.part, renamed when whole) and
recorded in its progress file with their sha256. A later merge of the same base, adapter and options
(the fingerprint: their files' sizes and modification times) skips the recorded shards; any other
merge into the same `--out` starts the directory afresh. A file lock keeps two merges out of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dsft.outputs import OutputLock

PROGRESS = "dsft-merge-progress.json"
LOCK = ".lock"


def fingerprint(files: list[Path], **options: Any) -> dict[str, Any]:
    """What the output depends on: every input file's size and mtime, and the merge options."""
    stats = {}
    for f in sorted(files):
        st = f.stat()
        stats[str(f.resolve())] = [st.st_size, st.st_mtime_ns]
    return {"files": stats, **options}


class PartialOutput:
    def __init__(self, out: Path, key: dict[str, Any]) -> None:
        self.out, self.key = out, key
        self.dir = out.parent / f".{out.name}.dsft-partial"
        self.done: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> "PartialOutput":
        self._lock = OutputLock(self.dir, "--out", LOCK, busy=f"--out {self.out}: another dsft merge is writing it; "
                                "wait for that one or choose another --out").__enter__()
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
        for p in self.dir.iterdir():
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def part(self, name: str) -> Path:
        return self.dir / f"{name}.part"

    def record(self, name: str, **info: Any) -> None:
        """The shard's NAME.part is whole: rename it and note it (atomically) as done."""
        os.replace(self.part(name), self.dir / name)
        self.done[name] = info
        tmp = self.dir / f"{PROGRESS}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.key, "done": self.done}, indent=2) + "\n")
        os.replace(tmp, self.dir / PROGRESS)

    def finish(self) -> None:
        """Move the finished output to `--out` (replacing it: the caller checked --force)."""
        (self.dir / PROGRESS).unlink(missing_ok=True)
        (self.dir / LOCK).unlink(missing_ok=True)
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.dir, self.out)
