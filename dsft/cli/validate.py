"""`dsft validate`: check a recipe without loading a model (and without importing torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import SetOpt, errors_exit_2


@errors_exit_2
def validate(
    recipe_arg: Annotated[Path | None, typer.Argument(metavar="RECIPE", help="Recipe YAML file (or --recipe).",
                                                      show_default=False)] = None,
    recipe_opt: Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe YAML file, as the other commands "
                                                    "take it.", show_default=False)] = None,
    check_files: Annotated[
        bool, typer.Option("--check-files", help="Also check data files, model directory, config, shards and tokenizer.")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Check a recipe: every problem at once, with its key and the fix."""
    from dsft.config import load_recipe
    from dsft.errors import DsftError

    if (recipe_arg is None) == (recipe_opt is None):
        raise DsftError("give the recipe once: `dsft validate RECIPE` or `dsft validate --recipe RECIPE`")
    recipe = recipe_arg or recipe_opt

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
