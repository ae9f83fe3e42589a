"""`dsft validate`: check a recipe without loading a model (and without importing torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import SetOpt, errors_exit_2


@errors_exit_2
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    check_files: Annotated[
        bool, typer.Option("--check-files", help="Also check data files, model directory, config, shards and tokenizer.")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Check a recipe: every problem at once, with its key and the fix."""
    from dsft.config import load_recipe

    resolved = load_recipe(recipe, set_ or [], check_files=check_files)
    if check_files:
        from dsft.data.formats import load_conversations
        from dsft.data.preference import load_pairs

        data = resolved.data
        if data.format == "preference":
            load_pairs([*data.train, *data.eval], data.system_prompt)
        else:
            load_conversations([*data.train, *data.eval], data.format, data.system_prompt)
    typer.echo(f"{recipe}: ok" + (" (files checked)" if check_files else ""))
