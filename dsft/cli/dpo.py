"""`dsft dpo`: preference alignment on chosen/rejected pairs."""

from __future__ import annotations

from dsft.cli._common import (
    ForceOpt, ProcessesOpt, RecipeOpt, ResumeFromOpt, ResumeOpt, SetOpt, errors_exit_2, run_training,
)


@errors_exit_2
def dpo(recipe: RecipeOpt, set_: SetOpt = None, force: ForceOpt = False, resume: ResumeOpt = False,
        resume_from: ResumeFromOpt = None, num_processes: ProcessesOpt = 1) -> None:
    """Align a model (or an SFT run, dpo.init_adapter) on preference pairs with DPO."""
    _summary(run_training("dpo", recipe, set_, force, resume, resume_from, num_processes))


def _summary(result) -> None:  # noqa: ANN001 - DpoResult, imported lazily
    from dsft.train.dist import is_main

    if not is_main():
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dsft dpo: {result.run}")
    table.add_column("what")
    table.add_column("first step", justify="right")
    table.add_column("last step", justify="right")
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        if key in result.first or key in result.last:
            fmt = lambda d: f"{d[key]:.3f}" if key in d else "-"  # noqa: E731
            table.add_row(key, fmt(result.first), fmt(result.last))
    c = result.counts
    table.add_row("pairs (prompts truncated / dropped)", f"{c['pairs']:,}", f"{c['truncated']} / {c['dropped']}")
    for group, n in result.groups.items():
        table.add_row(f"trainable params: {group}", "", f"{n:,}")
    table.add_row("adapter", "", str(result.run / "adapter"))
    Console().print(table)
