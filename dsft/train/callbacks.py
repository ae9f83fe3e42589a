"""Trainer callbacks: a JSONL metrics log that survives any logger choice."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dsft.runs.metrics import read_metrics


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


class EarlyStop(TrainerCallback):
    """training.early_stopping: after each evaluation, stop when the held-out loss has not fallen below its
    best by more than `min_delta` for `patience` evaluations in a row. Reads the history from the trainer's
    log (restored from the checkpoint on --resume), so it keeps no state of its own."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.report: dict[str, Any] | None = None

    def decide(self, history: list[tuple[int, float]]) -> dict[str, Any]:
        """From (step, eval_loss) in order: the best, how many evaluations since, and whether to stop."""
        best_step, best = history[0]
        since = 0
        for step, loss in history[1:]:
            if loss < best - self.min_delta:
                best_step, best, since = step, loss, 0
            else:
                since += 1
        return {"best_step": best_step, "best_eval_loss": best, "evaluations_without_improvement": since,
                "stop": since >= self.patience, "evaluations": len(history)}

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.report is not None:  # stopped already (the final evaluation after training comes here too)
            return
        history = [(r["step"], r["eval_loss"]) for r in state.log_history if "eval_loss" in r]
        if not history:
            return
        verdict = self.decide(history)
        if verdict["stop"] and state.global_step < state.max_steps:
            control.should_training_stop = True
            self.report = {"stopped_at_step": state.global_step, "of_steps": state.max_steps,
                           "patience": self.patience, "min_delta": self.min_delta,
                           **{k: v for k, v in verdict.items() if k != "stop"}}
            if state.is_world_process_zero:
                from dsft.console import say

                say(f"early stopping at step {state.global_step}/{state.max_steps}: held-out loss has not improved "
                    f"by more than {self.min_delta:g} for {verdict['evaluations_without_improvement']} evaluations "
                    f"(best {verdict['best_eval_loss']:.4f} at step {verdict['best_step']}; training.early_stopping)")


class TrackerFiles(TrainerCallback):
    """Note what the recipe's trackers write in the run directory as they write it (when training starts,
    at every log and checkpoint), so that --force later removes exactly that (dsft.runs.run_dir)."""

    def __init__(self, run: Path, trackers: list[str]) -> None:
        import time

        self.run, self.trackers, self.since = run, trackers, time.time() - 1

    def _note(self, state: Any) -> None:
        from dsft.runs.run_dir import record_tracker_files

        if self.trackers and state.is_world_process_zero:
            record_tracker_files(self.run, self.trackers, self.since)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._note(state)

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._note(state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._note(state)


# What a logged step shows on the console, in this order, around the objective's own keys (Objective.shown,
# after the learning rate; its log_parts after the loss); the full row is in metrics.jsonl and run.log.
SHOWN_FIRST = {"loss": "loss", "eval_loss": "held-out loss", "base_eval_loss": "base model's held-out loss",
               "learning_rate": "lr"}
SHOWN_LAST = {"balance_loss": "balance", "grad_norm": "grad norm"}


def number(value: Any) -> str:
    return f"{value:.2e}" if isinstance(value, float) and value and abs(value) < 1e-2 else \
        f"{value:.4g}" if isinstance(value, float) else str(value)


class ConsoleProgress(TrainerCallback):
    """dsft's training display (the Trainer's tqdm bar and printed dicts are removed): one progress
    phase over the optimizer steps with loss, lr, tokens/s and ETA, and a line per logged step."""

    def __init__(self, description: str = "training", shown: dict[str, str] | None = None,
                 parts: Callable[[dict[str, Any]], list[str]] | None = None) -> None:
        self.description = description
        self.shown = {**SHOWN_FIRST, **(shown or {}), **SHOWN_LAST}
        self.parts = parts or (lambda logs: [])
        self.phase = None
        self.tokens: tuple[float, float] | None = None  # (num_tokens, time) at the last log
        self.rate: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from dsft.console import Phase

            self.phase = Phase(self.description, state.max_steps, "steps", completed=state.global_step).__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.phase is not None:
            self.phase.update(completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or not state.is_world_process_zero:
            return
        import time

        shown = [f"{label} {number(logs[key])}" for key, label in self.shown.items() if key in logs and logs[key] is not None]
        shown[1:1] = self.parts(logs)
        if self.phase is None:  # after training: the final held-out evaluation
            if shown:
                from dsft.console import LOG, say

                line = f"step {state.global_step}: " + "  ".join(shown)
                # the held-out losses are in the command's final table: logged here, printed once there
                LOG.info(line) if set(logs) & set(self.shown) <= {"eval_loss", "base_eval_loss"} else say(line, highlight=False)
            return
        if "num_tokens" in logs:
            now, tokens = time.monotonic(), float(logs["num_tokens"])
            if self.tokens is not None and now > self.tokens[1] and tokens > self.tokens[0]:
                self.rate = (tokens - self.tokens[0]) / (now - self.tokens[1])
            self.tokens = (tokens, now)
        if "loss" in logs and self.rate is not None:
            shown.append(f"tok/s {self.rate:,.0f}")
        if not shown:
            return
        text = "  ".join(shown)
        if "loss" in logs:  # the bar keeps the headline numbers; the line has them all
            self.phase.update(completed=state.global_step,
                              info="  ".join(x for x in shown if not x.startswith(("grad norm", "balance"))))
        self.phase.note(f"step {state.global_step}/{state.max_steps}  {text}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self, error: BaseException | None = None) -> None:
        if self.phase is not None:
            phase, self.phase = self.phase, None
            phase.__exit__(type(error) if error else None, error, None)
