"""`dsft merge`: the adapter merged into the base checkpoint, in the base's own layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from dsft.cli._common import at_least, errors_exit_2


@errors_exit_2
def merge(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="A dsft run directory, or an adapter directory.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the merged checkpoint (must not exist).", show_default=False)],
    base: Annotated[Path | None, typer.Option("--base", help="The base checkpoint; default: the run's recipe model.path.")] = None,
    dtype: Annotated[Literal["bf16", "fp8"], typer.Option(help="For FP8 block-scaled bases: write bf16, or re-quantize to FP8.")] = "bf16",
    verify: Annotated[bool, typer.Option("--verify", help="Compare with base + adapter; exit 1 beyond tolerance.")] = False,
    verify_layers: Annotated[int | None, typer.Option(help="Verify on the first N layers only (big checkpoints).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a merged checkpoint dsft wrote at --out; merge a "
                                        "failed or interrupted run's adapter.")] = False,
) -> None:
    """Merge a LoRA / expert adapter into the ORIGINAL base weights, shard by shard, and optionally verify."""
    from rich.console import Console

    from dsft.export.merge import merge as run_merge
    from dsft.export.merge import resolve
    from dsft.train.run_dir import check_usable

    at_least("--verify-layers", verify_layers, 1)
    source = resolve(adapter, base)
    if source.run is not None:
        check_usable(source.run, force, "merge")
    record = run_merge(source, out, force=force, dtype=dtype)
    console = Console()
    console.print(f"merged {record['touched_tensors']} tensors of {source.base} into {out} "
                  f"({len(record['shards_sha256'])} shards, sha256 in dsft-merge.json)")
    if verify:
        from dsft.export.verify import verify as run_verify

        report = run_verify(source, out, record, verify_layers)
        _print(console, report)
        if not report["ok"]:
            raise typer.Exit(1)


def _print(console, report: dict) -> None:  # noqa: ANN001 - rich Console, imported lazily
    from rich.table import Table

    table = Table(title=f"merge verification ({report['dtype']}, {report['prompts']} prompts, layers: {report['layers']})")
    table.add_column("check")
    table.add_column("result", justify="right")
    table.add_row("max |logit difference| (adapter on unquantized base vs merged)", f"{report['max_abs']:.3g}")
    table.add_row("mean |logit difference|", f"{report['mean_abs']:.3g}")
    table.add_row("relative to max |logit|", f"{report['rel']:.3g} (tolerance {report['tolerance_rel']:g})")
    table.add_row("tokens with the same top-k experts", f"{report['same_expert_sets']:.2%}")
    unchanged = report["unchanged_experts"]
    table.add_row("adapted experts unchanged in the merge", ", ".join(unchanged) if unchanged else "none")
    if "nf4_adapter_vs_merged" in report:
        nf4 = report["nf4_adapter_vs_merged"]
        table.add_row("info: adapter on NF4 base vs merged (quantization error)",
                      f"max {nf4['max_abs']:.3g}, mean {nf4['mean_abs']:.3g}")
    table.add_row("verdict", "[green]ok[/green]" if report["ok"] else "[red]FAILED[/red]")
    console.print(table)
