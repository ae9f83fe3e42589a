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
        return [r["loss"] for r in self.rows if "loss" in r]
