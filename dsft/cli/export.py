"""`dsft export`: a run's adapter in the layout an inference server loads unmerged."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import AdapterOpt, OutOpt, errors_exit_2
from dsft.errors import DsftError


@errors_exit_2
def export(
    adapter: AdapterOpt,
    out: OutOpt,
    format: Annotated[str, typer.Option("--format", help="vllm: `vllm serve BASE --enable-lora "
                                        "--lora-modules NAME=OUT`.")] = "vllm",
    base: Annotated[Path | None, typer.Option("--base", help="The base checkpoint; default: the run's recipe model.path.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an export dsft wrote at --out; export a failed or "
                                        "interrupted run's adapter; export for a --base whose weights are not the ones it "
                                        "was trained on.")] = False,
) -> None:
    """Write the adapter as vLLM serves it unmerged: per-module scales folded, per-expert keys, one r / alpha."""
    from dsft.export.merge import resolve
    from dsft.export.vllm import export_vllm
    from dsft.train.run_dir import RunDir

    if format != "vllm":
        raise DsftError(f"--format: must be vllm (got {format!r}); other servers load `dsft merge` output")
    source = resolve(adapter, base)
    if source.run is not None:
        RunDir(source.run).check_usable(force, "export")
    record = export_vllm(source, out, force)
    typer.echo(f"{out}: {record['tensors']} LoRA tensors for vLLM; serve with: vllm serve {source.base} --enable-lora "
               f"--max-lora-rank {record['max_lora_rank']} --lora-modules NAME={out}")
