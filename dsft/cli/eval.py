"""`dsft eval`: held-out loss base vs adapter, sample answers, routing drift."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import at_least, errors_exit_2


@errors_exit_2
def eval_(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="A finished dsft run directory.", show_default=False)],
    data: Annotated[str | None, typer.Option(help="Held-out file in the run's data format; default: its data.eval "
                                             "(without one: exit 2, or --on-train).")] = None,
    samples: Annotated[int, typer.Option(help="Examples scored.")] = 256,
    generations: Annotated[int, typer.Option(help="Prompts answered greedily.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per generated answer.")] = 48,
    force: Annotated[bool, typer.Option("--force", help="Evaluate a failed or interrupted run's adapter.")] = False,
    on_train: Annotated[bool, typer.Option("--on-train", help="Without held-out data: score the training data "
                                           "(labelled so; not a held-out measure).")] = False,
) -> None:
    """Score a run on held-out data (base vs adapter), show a few answers; writes RUN/eval.json."""
    from rich.console import Console
    from rich.table import Table

    from dsft.train.evaluate import evaluate

    at_least("--samples", samples, 1)
    at_least("--generations", generations, 0)
    at_least("--max-new-tokens", max_new_tokens, 1)
    report = evaluate(adapter, data, samples, generations, max_new_tokens, force, on_train)
    console = Console()
    table = Table(title=f"dsft eval: {adapter} ({report['examples']} examples, {report['data_kind']})")
    for col in ("", "loss", "perplexity"):
        table.add_column(col, justify="right" if col else "left")
    for name in ("base", "adapter"):
        table.add_row(name, f"{report[name]['loss']:.3f}", f"{report[name]['perplexity']:.1f}")
    console.print(table)
    if report["routing_drift"]:
        drift = ", ".join(f"L{layer}: {moved:.1%}" for layer, moved in report["routing_drift"].items())
        console.print(f"routing drift (share of each layer's expert load moved by the adapter): {drift}")
    for a in report["answers"]:
        console.print(f"[bold]Q:[/bold] {a['prompt']}\n[bold]A:[/bold] {a['answer']}\n[dim]reference: {a['reference']}[/dim]")
    console.print(f"{adapter / 'eval.json'}")
