"""`dsft eval`: held-out loss base vs adapter, sample answers, routing drift."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import at_least, errors_exit_2


PAIR_CAPTION = ("log-prob acc: share of pairs whose chosen answer has the higher log-prob, per token (length-"
                "normalised) and summed (favours the shorter answer); margin: mean summed log p(chosen) - log p(rejected); "
                "implicit reward acc / margin: DPO's reward beta * (log p_adapter - log p_reference) of chosen vs "
                "rejected, what DPO logs as rewards/accuracies (docs/eval.md)")


@errors_exit_2
def eval_(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="A finished dsft run directory (or its adapter/).", show_default=False)],
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
    against: Annotated[Path | None, typer.Option("--against", help="A second run of the same base (say the SFT run "
                                                 "a DPO run continued), scored on the same rows, side by side.",
                                                 show_default=False)] = None,
) -> None:
    """Score a run on held-out data (base vs adapter), show a few answers; writes RUN/eval.json."""
    from dsft.console import console as dsft_console
    from dsft.console import show
    from dsft.train.evaluate import evaluate

    from dsft.train.run_dir import run_of

    adapter, against = run_of(adapter), run_of(against) if against is not None else None
    at_least("--samples", samples, 1)
    at_least("--generations", generations, 0)
    at_least("--max-new-tokens", max_new_tokens, 1)
    if against is not None:
        _same_base(adapter, against)
    report = evaluate(adapter, data, samples, generations if against is None else 0, max_new_tokens, force, on_train)
    reports = {str(adapter): report}
    if against is not None:
        reports[str(against)] = evaluate(against, report["data"], samples, 0, max_new_tokens, force, True)
    console = dsft_console()
    pairs = report["rows"] == "pairs"
    source = {"held-out": "held-out data.eval", "training data": "training data (--on-train), not held-out"}.get(
        report["data_kind"], f"--data {data}")
    what = f"{report['examples']} {'pairs' if pairs else 'examples'}, {source}"
    show(_table(adapter, reports, what, pairs))
    if pairs:
        for name, r in reports.items():
            i = r["implicit_reward"]
            console.print(f"{name}: implicit reward against {i['reference']} (beta {i['beta']:g}): accuracy "
                          f"{i['accuracy']:.1%}, margin {i['margin']:+.3f}", soft_wrap=True)
    if report["truncated"]:
        console.print(f"{report['truncated']} {'sequences' if pairs else 'examples'} longer than the run's data.max_length "
                      f"({report['max_length']} tokens) were cut to it, as in training", soft_wrap=True)
    for name, r in reports.items():
        if r["routing_drift"]:
            drift = ", ".join(f"L{layer}: {moved:.1%}" for layer, moved in r["routing_drift"].items())
            console.print(f"routing drift of {name} on these {r['examples']} rows (share of each layer's "
                          f"expert load the adapter moved): {drift}", soft_wrap=True)
    for a in report["answers"]:
        console.print(f"[bold]Q:[/bold] {a['prompt']}\n[bold]A:[/bold] {a['answer']}\n[dim]reference: {a['reference']}[/dim]")
    for name in reports:
        console.print(f"{Path(name) / 'eval.json'}, {Path(name) / 'eval.png'}", soft_wrap=True)


def _table(adapter: Path, reports: dict, what: str, pairs: bool):
    from rich.table import Table

    title = f"dsft eval: {adapter}" + (f" against {list(reports)[1]}" if len(reports) > 1 else "") + f" ({what})"
    table = Table(title=title, caption=PAIR_CAPTION if pairs else "loss: mean cross-entropy per assistant token")
    columns = ("", "loss (chosen)" if pairs else "loss", "perplexity",
               *(("log-prob acc (per token)", "log-prob acc (sum)", "margin (sum)", "implicit reward acc",
                  "implicit margin") if pairs else ()))
    for col in columns:
        table.add_column(col, justify="right" if col else "left")
    first = next(iter(reports.values()))
    rows = [("base", first["base"], None)] + [(name if len(reports) > 1 else "adapter", r["adapter"], r)
                                               for name, r in reports.items()]
    for label, r, whole in rows:
        extra = ()
        if pairs:
            p = r["pairs"]
            i = whole["implicit_reward"] if whole else None
            extra = (f"{p['normalized_accuracy']:.1%}", f"{p['accuracy']:.1%}", f"{p['margin']:+.3f}",
                     f"{i['accuracy']:.1%}" if i else "-", f"{i['margin']:+.3f}" if i else "-")
        table.add_row(label, f"{r['loss']:.3f}", f"{r['perplexity']:.1f}", *extra)
    return table


def _same_base(run: Path, other: Path) -> None:
    """--against: both runs' adapters were trained on the same base weights (read from their metadata)."""
    from dsft.adapters.metadata import read_metadata
    from dsft.errors import DsftError
    from dsft.train.run_dir import adapter_dir

    ids = []
    for path in (run, other):
        if not (adapter_dir(path) / "adapter_config.json").is_file():
            raise DsftError(f"--against {other}: {path} is not a finished dsft run directory (no adapter/)")
        base = read_metadata(adapter_dir(path)).get("base_model") or {}
        ids.append((base.get("config_sha256"), base.get("weights_fingerprint")))
    if ids[0] != ids[1]:
        raise DsftError(f"--against {other}: trained on another base than {run} (config or weights differ); "
                        "compare runs of the same base")
