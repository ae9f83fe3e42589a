"""`dsft sft`: supervised LoRA fine-tuning from a recipe."""

from __future__ import annotations

from dsft.cli._common import (
    ForceOpt, ProcessesOpt, RecipeOpt, ResumeFromOpt, ResumeOpt, SetOpt, errors_exit_2, run_training,
)


@errors_exit_2
def sft(recipe: RecipeOpt, set_: SetOpt = None, force: ForceOpt = False, resume: ResumeOpt = False,
        resume_from: ResumeFromOpt = None, num_processes: ProcessesOpt = 1) -> None:
    """Train a LoRA adapter on the recipe's data; writes adapter, recipe, run.json and metrics."""
    _summary(run_training("sft", recipe, set_, force, resume, resume_from, num_processes))


def _summary(result) -> None:  # noqa: ANN001 - SftResult, imported lazily
    from dsft.train.dist import is_main

    if not is_main():
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dsft sft: {result.run}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for group, n in result.groups.items():
        table.add_row(f"trainable params: {group}", f"{n:,}")
    table.add_row("trainable / total params", f"{result.trainable:,} / {result.total:,}")
    table.add_row("train tokens (on loss), after truncation", f"{result.train_tokens:,} ({result.loss_tokens:,})")
    cut = result.truncation
    if cut and cut["truncated"]:
        table.add_row("rows cut to data.max_length (left without loss tokens)",
                      f"{cut['truncated']:,} of {cut['rows']:,} ({cut['no_loss_tokens']:,})")
    if result.losses:
        table.add_row("loss first -> last", f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    if result.eval_loss is not None:
        table.add_row("eval loss", f"{result.eval_loss:.3f}")
    table.add_row("adapter", str(result.run / "adapter"))
    Console().print(table)
