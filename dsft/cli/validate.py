"""`dsft validate`: check a recipe without loading a model (statically, without torch; with --check-files, every
check `dsft sft` / `dsft dpo` makes before loading weights)."""

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
        bool, typer.Option("--check-files", help="Also make every check `dsft sft` / `dsft dpo` makes before loading "
                           "weights: data rows, model files, expert selection, output location, tokens.")
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
    if check_files:  # every check `dsft sft` / `dsft dpo` makes before loading weights, with the same code
        from dsft.outputs import check_location
        from dsft.train.objective import objective_for
        from dsft.train.pipeline import preflight
        from dsft.runs.lifecycle import run_inputs

        goal = objective_for(resolved)
        check_location(Path(resolved.output_dir), "output_dir", run_inputs(resolved))
        preflight(resolved, goal, force=False, check_output=False, world=None)
        typer.echo(f"{recipe}: ok (files checked as `dsft {goal.name}` checks them: data rows, model files, expert "
                   "selection, tokenizer, tokens)")
        return
    typer.echo(f"{recipe}: ok (statically: {_unchecked(resolved)}; `--check-files` reads them as `dsft sft` does)")


def _unchecked(recipe) -> str:  # noqa: ANN001 - a Recipe
    """What a static validate did not read, and which of those paths do not exist (a recipe's placeholders)."""
    from dsft.config.schema import BUILTIN_PREFIX
    from dsft.hub import SCHEME, is_repo_id

    missing, hub = [], []
    model = recipe.model.path
    if is_repo_id(model):
        hub.append(f"model.path {model}")
    elif not model.startswith(BUILTIN_PREFIX) and not Path(model).is_dir():
        missing.append(f"model.path {model}")
    for split in ("train", "eval"):
        for path in getattr(recipe.data, split):
            if path.startswith(SCHEME):
                hub.append(f"data.{split} {path}")
            elif not Path(path).is_file():
                missing.append(f"data.{split} {path}")
    parts = ["no model or data file was read"]
    if missing:
        parts.append(f"{len(missing)} do not exist: {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
    if hub:
        parts.append(f"Hub ids not resolved: {', '.join(hub[:4])}")
    return "; ".join(parts)
