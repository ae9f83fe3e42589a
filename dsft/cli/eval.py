"""`dsft eval`: held-out loss base vs adapter, sample answers, routing drift."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import at_least, errors_exit_2


@errors_exit_2
def eval_(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="A finished dsft run directory.", show_default=False)],
    data: Annotated[str | None, typer.Option(help="Held-out rows: preference pairs (chosen/rejected, scored as pairs) "
                                             "or conversations (messages, prompt/completion, alpaca), for SFT and DPO "
                                             "runs alike; default: the run's data.eval (without one: exit 2, or "
                                             "--on-train).")] = None,
    samples: Annotated[int, typer.Option(help="Examples scored.")] = 256,
    generations: Annotated[int, typer.Option(help="Prompts answered greedily.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per generated answer.")] = 48,
    force: Annotated[bool, typer.Option("--force", help="Evaluate a failed or interrupted run's adapter, or on a base whose weights are not the ones it "
                                        "was trained on.")] = False,
    on_train: Annotated[bool, typer.Option("--on-train", help="Without held-out data: score the training data "
                                           "(labelled so; not a held-out measure).")] = False,
) -> None:
    """Score a run on held-out data (base vs adapter), show a few answers; writes RUN/eval.json."""
    from rich.table import Table

    from dsft.console import console as dsft_console
    from dsft.console import show
    from dsft.train.evaluate import evaluate

    at_least("--samples", samples, 1)
    at_least("--generations", generations, 0)
    at_least("--max-new-tokens", max_new_tokens, 1)
    report = evaluate(adapter, data, samples, generations, max_new_tokens, force, on_train)
    console = dsft_console()
    pairs = report["rows"] == "pairs"
    source = {"held-out": "held-out data.eval", "training data": "training data (--on-train), not held-out"}.get(
        report["data_kind"], f"--data {data}")
    what = f"{report['examples']} {'pairs' if pairs else 'examples'}, {source}"
    table = Table(title=f"dsft eval: {adapter} ({what})")
    columns = ("", "loss (chosen)" if pairs else "loss", "perplexity", *(("pair accuracy", "mean margin") if pairs else ()))
    for col in columns:
        table.add_column(col, justify="right" if col else "left")
    for name in ("base", "adapter"):
        r = report[name]
        extra = (f"{r['pairs']['accuracy']:.1%}", f"{r['pairs']['margin']:+.3f}") if pairs else ()
        table.add_row(name, f"{r['loss']:.3f}", f"{r['perplexity']:.1f}", *extra)
    show(table)
    if report["truncated"]:
        console.print(f"{report['truncated']} {'sequences' if pairs else 'examples'} longer than the run's data.max_length "
                      f"({report['max_length']} tokens) were cut to it, as in training", soft_wrap=True)
    if report["routing_drift"]:
        drift = ", ".join(f"L{layer}: {moved:.1%}" for layer, moved in report["routing_drift"].items())
        console.print(f"routing drift on these {report['examples']} rows (share of each layer's "
                      f"expert load the adapter moved): {drift}", soft_wrap=True)
    for a in report["answers"]:
        console.print(f"[bold]Q:[/bold] {a['prompt']}\n[bold]A:[/bold] {a['answer']}\n[dim]reference: {a['reference']}[/dim]")
    console.print(f"{adapter / 'eval.json'}, {adapter / 'eval.png'}", soft_wrap=True)
