"""`dsft sft`: supervised LoRA fine-tuning from a recipe."""

from __future__ import annotations

from typing import Any

from dsft.cli._common import training_command


def _rows(result: Any) -> list[tuple[str, str]]:  # an SftResult, imported lazily
    rows = [(f"trainable params: {group}", f"{n:,}") for group, n in result.groups.items()]
    rows.append(("trainable / total params", f"{result.trainable:,} / {result.total:,}"))
    rows.append(("train tokens (on loss), after truncation", f"{result.train_tokens:,} ({result.loss_tokens:,})"))
    cut = result.truncation
    if cut and cut["truncated"]:
        rows.append(("rows cut to data.max_length (left without loss tokens)",
                     f"{cut['truncated']:,} of {cut['rows']:,} ({cut['no_loss_tokens']:,})"))
    if result.losses:
        rows.append(("loss first -> last", f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}"))
    if result.eval_loss is not None:
        base = f"base {result.base_eval_loss:.3f} -> " if result.base_eval_loss is not None else ""
        rows.append(("held-out loss (data.eval)", f"{base}{result.eval_loss:.3f}"))
    if result.routing_change:
        layer, moved = max(result.routing_change.items(), key=lambda kv: kv[1])
        rows.append((f"routing change on {result.routing_rows:,} profiled training rows", f"L{layer}: {moved:.1%} of its load moved"))
    return rows


sft = training_command("sft", "Train a LoRA adapter on the recipe's data; writes adapter, recipe, run.json and metrics.",
                       ("what", "value"), _rows)
