"""`dsft experts profile|plan`: where the task's tokens are routed, and which experts a recipe adapts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import RecipeArg, RecipeOpt, SetOpt, at_least, errors_exit_2, one_recipe
from dsft.errors import DsftError

app = typer.Typer(help="Routing profile and expert targeting plan.", no_args_is_help=True)

ReprofileOpt = Annotated[bool, typer.Option("--reprofile", help="Profile again even if a matching profile is cached.")]


def _prepare(recipe: Path, set_: list[str] | None):
    """The recipe checked as its objective checks it (the one whose section it sets, else the one its
    data.format is for: dsft.train.objective.objective_for); the run directory, where the profile and plan go,
    may hold a run (they are its cache) but may not be in use, be a file, or lie inside a checkpoint."""
    from dsft.config import load_recipe
    from dsft.outputs import check_location
    from dsft.train.objective import objective_for
    from dsft.train.pipeline import preflight
    from dsft.runs.lifecycle import run_inputs
    from dsft.runs.run_dir import check_not_in_use

    resolved = load_recipe(recipe, set_ or [], check_files=True)
    output = Path(resolved.output_dir)
    check_location(output, "output_dir", run_inputs(resolved))
    check_not_in_use(output)
    prepared = preflight(resolved, objective_for(resolved), force=False, check_output=False)
    from dsft import arch

    if not arch.moe_layers(prepared.config):
        raise DsftError(f"model.path: {resolved.model.path} is a dense {prepared.config.get('model_type')} model with no "
                        "routed experts; `dsft experts` profiles and plans routed experts only (use `dsft sft`)")
    return prepared


def _profile(prepared, samples: int, count: str, reprofile: bool):  # noqa: ANN001, ANN202 - lazy types
    """(profile, its directory, whether it was computed now). The model is loaded only when needed."""
    from dsft.models.identity import model_identity
    from dsft.models.load import load_model
    from dsft.moe.profile import read_profile
    from dsft.runs.lifecycle import data_sha256
    from dsft.train.targeting import ROUTING_DIR, ensure_profile, profile_key

    recipe = prepared.recipe
    identity = model_identity(prepared.model_path, recipe.model.path)
    key = profile_key(recipe, identity, data_sha256(recipe), samples, count)
    directory = Path(recipe.output_dir) / ROUTING_DIR
    cached = None if reprofile else read_profile(directory, key)
    if cached is not None:
        return cached, directory, False
    model = load_model(recipe.model, prepared.model_path)
    result, _ = ensure_profile(model, recipe, prepared.train, prepared.tokenizer.pad_token_id, key, directory,
                               samples, count, reprofile=True)
    return result, directory, True


@app.command("profile")
@errors_exit_2
def profile(
    recipe_file: RecipeArg = None,
    recipe: RecipeOpt = None,
    samples: Annotated[int | None, typer.Option(help="Training rows to profile (default: the recipe's, else 1000).")] = None,
    all_tokens: Annotated[bool, typer.Option("--all-tokens", help="Count every real token, not only those the loss is on.")] = False,
    reprofile: ReprofileOpt = False,
    set_: SetOpt = None,
) -> None:
    """Profile the base model's routing on the recipe's training data; writes RUN/routing/."""
    from dsft.console import console as dsft_console
    from dsft.console import show
    from dsft.moe.profile import summary_table

    at_least("--samples", samples, 1)
    prepared = _prepare(one_recipe(recipe_file, recipe), set_)
    spec = prepared.recipe.adapter.routed_experts
    count = "all" if all_tokens else spec.count
    result, directory, computed = _profile(prepared, samples or spec.samples, count, reprofile)
    show(summary_table(result))
    console = dsft_console()
    state = "written" if computed else "cached (use --reprofile to recompute)"
    console.print(f"{directory}/profile.json, profile.csv, heatmap.png: {state}")


@app.command("plan")
@errors_exit_2
def plan(recipe_file: RecipeArg = None, recipe: RecipeOpt = None, reprofile: ReprofileOpt = False, set_: SetOpt = None) -> None:
    """Show which modules and experts the recipe adapts, with parameter counts and memory; writes RUN/plan.json."""
    from dsft.adapters.plan import plan_table
    from dsft.console import show
    from dsft.train.targeting import data_summary, policy_selection, write_plan

    prepared = _prepare(one_recipe(recipe_file, recipe), set_)
    selection = prepared.selection
    if selection is None:
        spec = prepared.recipe.adapter.routed_experts
        result, directory, _ = _profile(prepared, spec.samples, spec.count, reprofile)
        selection = policy_selection(prepared.recipe, result, directory)
    run = Path(prepared.recipe.output_dir)
    result = write_plan(run, prepared.recipe, prepared.config, selection, data_summary(prepared.train, prepared.eval))
    show(plan_table(result, _measured_peak(run)))
    typer.echo(f"{run / 'plan.json'}")


def _measured_peak(run: Path) -> float | None:
    from dsft.runs import run_dir

    try:
        import torch

        summary = run_dir.info(run)["summary"]
        return summary["peak_gpu_gib"] if torch.cuda.is_available() else summary.get("peak_host_gib")
    except (DsftError, KeyError, TypeError):
        return None
