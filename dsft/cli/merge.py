"""`dsft merge`: the adapter merged into the base checkpoint, in the base's own layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from dsft.cli._common import AdapterOpt, OutOpt, at_least, errors_exit_2


@errors_exit_2
def merge(
    adapter: AdapterOpt,
    out: OutOpt,
    base: Annotated[Path | None, typer.Option("--base", help="The base checkpoint; default: the run's recipe model.path.")] = None,
    dtype: Annotated[Literal["bf16", "fp8"], typer.Option(
        help="For FP8 block-scaled bases: write all bf16, or keep untouched weights FP8 byte for byte and write the "
             "touched Linears / layers' experts in bf16 (declared unquantized in config.json).")] = "bf16",
    requantize: Annotated[bool, typer.Option("--requantize", help="With --dtype fp8: re-quantize the touched weights "
                                             "to FP8 too (smaller; reports how much of the fine-tune survived).")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Compare with base + adapter; exit 1 beyond tolerance.")] = False,
    verify_layers: Annotated[int | None, typer.Option(help="Verify on the first N layers only (big checkpoints).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a merged checkpoint dsft wrote at --out; merge a "
                                        "failed or interrupted run's adapter; merge into a --base whose weights are not the "
                                        "ones it was trained on.")] = False,
) -> None:
    """Merge a LoRA / expert adapter into the ORIGINAL base weights, shard by shard, and optionally verify."""
    from dsft.console import console as dsft_console
    from dsft.export.merge import merge as run_merge
    from dsft.export.merge import resolve
    from dsft.runs.run_dir import check_usable, describe_checkpoint

    at_least("--verify-layers", verify_layers, 1)
    source = resolve(adapter, base)
    if source.run is not None and source.checkpoint is None:  # a checkpoint was chosen as it is
        check_usable(source.run, force, "merge")
    record = run_merge(source, out, force=force, dtype=dtype, requantize=requantize)
    console = dsft_console()
    console.print(f"merged {record['touched_tensors']} tensors of {source.base} into {out} "
                  f"({len(record['shards_sha256'])} shards, sha256 in dsft-merge.json)"
                  + (f"; the adapter of {describe_checkpoint(source.checkpoint)}" if source.checkpoint else ""),
                  soft_wrap=True)
    if verify:
        from dsft.export.verify import verify as run_verify

        report = run_verify(source, out, record, verify_layers)
        _print(console, report)
        if not report["ok"]:
            raise typer.Exit(1)


def _print(console, report: dict) -> None:  # noqa: ANN001 - rich Console, imported lazily
    from rich.table import Table

    from dsft.console import show

    exact, logits = report["exact"], report["logits"]
    table = Table(title=f"merge verification ({report['prompts']} prompts, layers: {report['layers']})")
    table.add_column("check")
    table.add_column("result", justify="right")
    mark = lambda ok: "[green]ok[/green]" if ok else "[red]FAILED[/red]"  # noqa: E731
    table.add_row("touched tensors = W + sBA rounded once (bit-equal / all)",
                  f"{exact['bit_equal'] - exact['untouched']} / {exact['touched']}" if not exact["mismatched"]
                  else f"{exact['mismatched']} wrong, first: {exact['first_mismatches'][0]}")
    table.add_row("untouched tensors as in the base", f"{exact['untouched']}")
    if exact["names"]:
        table.add_row("tensor names", ", ".join(exact["names"]))
    worst = exact["worst"]
    table.add_row("worst tensor", f"{worst['tensor']}: {worst['ulps']} ulp (limit {exact['ulp_limit']})"
                  if worst["tensor"] else "none differs")
    if exact["retention"] is not None:
        table.add_row("fine-tune delta retained by the stored weights", f"{exact['retention']:.4f}")
    table.add_row("exact check", mark(exact["ok"]))
    table.add_row("mean |logit gap| merged vs adapter (fp32)",
                  f"{logits['mean_abs']:.3g} (limit {logits['mean_limit']:.3g}: 2 x floor {logits['floor_mean_abs']:.3g} + 1e-6 of the max)")
    table.add_row("max |logit gap| (information)", f"{logits['max_abs']:.3g} (floor {logits['floor_max_abs']:.3g})")
    table.add_row("tokens with the adapter's top-k experts", f"{logits['same_topk']:.2%} (floor {logits['floor_same_topk']:.2%})")
    if "nf4_adapter_vs_merged" in report:
        nf4 = report["nf4_adapter_vs_merged"]
        table.add_row("info: adapter on NF4 base vs merged (quantization error)",
                      f"max {nf4['max_abs']:.3g}, mean {nf4['mean_abs']:.3g}")
    table.add_row("logit check", mark(logits["ok"]))
    table.add_row("verdict", mark(report["ok"]))
    show(table)
