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
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="A dsft run directory (or its adapter/), or one of its "
                                          "checkpoints (RUN/checkpoints/checkpoint-N: a run interrupted or still "
                                          "short of its end).", show_default=False)],
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
                                                 "a DPO run continued), scored on the same rows, side by side; the "
                                                 "comparison is written to the first run (comparison.json, "
                                                 "comparison.png) or --out, nothing into the second.",
                                                 show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="With --against: the directory the comparison is "
                                             "written to instead of the first run.", show_default=False)] = None,
) -> None:
    """Score a run (or one of its checkpoints) on held-out data (base vs adapter), show a few answers; writes
    RUN/eval.json and eval.png (a checkpoint: RUN/eval-checkpoint.json; --against: RUN/comparison.json)."""
    from dsft.console import console as dsft_console
    from dsft.errors import DsftError
    from dsft.outputs import check_writable
    from dsft.evaluate import eval_figure, evaluate, write_report
    from dsft.runs import run_dir

    adapter, against = run_dir.run_of(adapter), run_dir.run_of(against) if against is not None else None
    at_least("--samples", samples, 1)
    at_least("--generations", generations, 0)
    at_least("--max-new-tokens", max_new_tokens, 1)
    if out is not None and against is None:
        raise DsftError("--out: only with --against (a run's own eval goes into the run directory)")
    if against is not None:
        _same_base(adapter, against)
    target = _target(adapter, against, out)
    check_writable(target.parent, "--out" if out is not None else "--adapter")
    report = evaluate(adapter, data, samples, generations, max_new_tokens, force, on_train)
    reports = {report["evaluated"]: report}
    if against is not None:
        other = evaluate(against, report["data"], samples, generations, max_new_tokens, force, False,
                         rows_of=f"{report['data_source']} of {report['run']}")
        reports[other["evaluated"]] = other
    console = dsft_console()
    _print_reports(console, report, reports)
    if against is None:
        write_report(report, target, eval_figure(report))
    else:
        others = dict(list(reports.items())[1:])
        comparison = {"runs": list(reports), "data": report["data"], "data_source": report["data_source"],
                      "reports": reports, "answers": _side_by_side(reports)}
        write_report(comparison, target, eval_figure(report, others))
    console.print(f"{target}, {target.with_suffix('.png')}", soft_wrap=True)


def _print_reports(console, report: dict, reports: dict) -> None:
    """The table, the implicit rewards of pair data, truncation, routing drift and the sample answers."""
    from dsft.console import show

    pairs = report["rows"] == "pairs"
    kinds = {r["data_kind"] for r in reports.values()}
    what = f"{report['examples']} {'pairs' if pairs else 'examples'}, {report['data_source']}: " + \
        (" / ".join(f"{r['data_kind']} for {Path(r['run']).name}" for r in reports.values()) if len(kinds) > 1 else
         next(iter(kinds)) + ("" if "training data" not in kinds else ", not a held-out measure"))
    show(_table(report["evaluated"], reports, what, pairs))
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
    _print_answers(console, reports)


def _target(adapter: Path, against: Path | None, out: Path | None) -> Path:
    """Where the report goes: RUN/eval.json, RUN/eval-checkpoint.json for a checkpoint, RUN/comparison.json with
    --against (or --out DIR/comparison.json): never into the second run."""
    from dsft.outputs import check_location, resolve_output
    from dsft.runs import run_dir

    checkpoint_of = run_dir.run_of_checkpoint(adapter)
    run = checkpoint_of or adapter
    if against is None:
        return run / (run_dir.CHECKPOINT_EVAL if checkpoint_of else run_dir.EVAL)
    if out is None:
        return run / run_dir.COMPARISON
    from dsft.errors import DsftError

    out = resolve_output(out, "--out")
    second = against.resolve()
    if out == second or second in out.parents:
        raise DsftError(f"--out {out}: inside the second run {against}; a comparison writes nothing into it: choose a "
                        "directory outside it (or leave --out out: the comparison goes into the first run)")
    check_location(out, "--out", {"second run (--against)": [against]})
    out.mkdir(parents=True, exist_ok=True)
    return out / run_dir.COMPARISON


def _side_by_side(reports: dict) -> list[dict]:
    """The sample answers of every run to the same prompts, with the reference answer."""
    first = next(iter(reports.values()))["answers"]
    out = []
    for i, a in enumerate(first):
        row = {"prompt": a["prompt"], "reference": a["reference"]}
        for name, r in reports.items():
            row[name] = r["answers"][i]["answer"] if i < len(r["answers"]) else None
        out.append(row)
    return out


def _print_answers(console, reports: dict) -> None:
    if len(reports) == 1:
        for a in next(iter(reports.values()))["answers"]:
            console.print(f"[bold]Q:[/bold] {a['prompt']}\n[bold]A:[/bold] {a['answer']}\n[dim]reference: {a['reference']}[/dim]")
        return
    for row in _side_by_side(reports):
        console.print(f"[bold]Q:[/bold] {row['prompt']}")
        for name in reports:
            console.print(f"[bold]{Path(reports[name]['run']).name}:[/bold] {row[name]}")
        console.print(f"[dim]reference: {row['reference']}[/dim]")


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
    from dsft.runs.run_dir import adapter_source

    ids = []
    for path, key in ((run, "--adapter"), (other, "--against")):
        _, adapter, _ = adapter_source(path, key, "evaluate")
        base = read_metadata(adapter).get("base_model") or {}
        ids.append((base.get("config_sha256"), base.get("weights_fingerprint")))
    if ids[0] != ids[1]:
        raise DsftError(f"--against {other}: trained on another base than {run} (config or weights differ); "
                        "compare runs of the same base")
