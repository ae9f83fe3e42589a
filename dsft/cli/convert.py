"""`dsft convert`: pickle `.bin` weights to safetensors, without unpickling anything but tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import OutOpt, errors_exit_2


@errors_exit_2
def convert(
    model: Annotated[Path, typer.Option("--model", "-m", help="A checkpoint directory with pytorch_model*.bin weights.",
                                        show_default=False)],
    out: OutOpt,
    force: Annotated[bool, typer.Option("--force", help="Replace a directory an earlier `dsft convert` wrote.")] = False,
) -> None:
    """Rewrite a `.bin`-only checkpoint as safetensors (torch.load weights_only: tensors only), shard by shard."""
    from dsft.models.convert import convert as run_convert

    record = run_convert(model, out, force)
    typer.echo(f"{out}: {record['tensors']} tensors in {len(record['shards'])} safetensors shards "
               f"(from {model}; dsft-convert.json)")
    if record["not_copied"]:
        typer.echo(f"not copied (weight files that are not the release's .bin shards): {', '.join(record['not_copied'])}")
