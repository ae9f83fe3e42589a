"""A run's metrics.jsonl: every logged step, appended by training (dsft.train.callbacks.JsonlMetrics), read
by the console, curves, the card and eval, and cut back to a checkpoint's step on resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dsft.outputs import write_atomic


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl's rows, and how many lines were torn or not JSON (a kill during an append)."""
    rows, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            torn += 1
    return rows, torn


def trim_metrics(path: Path, step: int) -> None:
    """Drop logged rows after `step` (the resumed run logs them again) and any torn line a kill left."""
    if path.is_file():
        rows, torn = read_metrics(path)
        if torn:
            print(f"warning: {path}: dropped {torn} torn or unreadable line(s) left by the interrupted run",
                  file=sys.stderr)
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
