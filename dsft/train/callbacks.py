"""Trainer callbacks: a JSONL metrics log that survives any logger choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class JsonlMetrics(TrainerCallback):
    """Append every logged dict, with its step and epoch, to `metrics.jsonl`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def losses(self) -> list[float]:
        """The training loss of every logged step of the run, its part before a resume included."""
        rows = read_metrics(self.path)[0] if self.path.is_file() else self.rows
        return [r["loss"] for r in rows if "loss" in r]


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
