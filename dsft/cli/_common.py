"""Shared option aliases and the error boundary of every command."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from dsft.errors import DsftError

F = TypeVar("F", bound=Callable[..., Any])

RecipeOpt = Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe YAML file (or give it positionally).",
                                                show_default=False)]
RecipeArg = Annotated[Path | None, typer.Argument(help="Recipe YAML file (or --recipe).", show_default=False)]


def one_recipe(positional: Path | None, option: Path | None) -> Path:
    """The recipe given positionally or with --recipe, once."""
    if positional is not None and option is not None and positional != option:
        raise DsftError(f"--recipe: given twice ({positional} and --recipe {option}); give one recipe")
    recipe = positional or option
    if recipe is None:
        raise DsftError("--recipe: give the recipe file, e.g. `dsft sft recipes/tiny-legal.yaml` or --recipe FILE")
    return recipe
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set training.lr=1e-4 (repeatable).", show_default=False),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")]
AdapterOpt = Annotated[Path, typer.Option("--adapter", "-a", help="A dsft run directory, or an adapter directory.",
                                          show_default=False)]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (must not exist; --force replaces only "
                                      "one dsft wrote).", show_default=False)]
ProcessesOpt = Annotated[int, typer.Option("--num-processes", min=1,
                                           help="Train on N processes (GPUs) through `accelerate launch`.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its latest complete checkpoint.")]
ResumeFromOpt = Annotated[str | None, typer.Option("--resume-from", help="Continue from this checkpoint directory.",
                                                   show_default=False)]


def at_least(option: str, value: int | None, low: int) -> None:
    """An option's lower bound, reported as dsft's one line (not Click's usage box)."""
    if value is not None and value < low:
        raise DsftError(f"{option}: must be >= {low} (got {value})")


def offline() -> None:
    """dsft's libraries never download weights, data or kernels on their own: every hub client is told so
    before it is imported (a Hub id the recipe names is fetched by dsft.hub alone, and only when the user's
    HF_HUB_OFFLINE, noted first, allows it), and the libraries' deprecation chatter is silenced."""
    from dsft.hub import remember_user_offline

    remember_user_offline()
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # bitsandbytes tries to fetch an optional CPU kernel from the hub and warns when it cannot.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # the kernels package (bitsandbytes' optional kernels) says it skips a hub trust check in offline mode
    logging.getLogger("kernels").setLevel(logging.ERROR)


def quiet_bars() -> None:
    """No library progress bars (dsft shows its own, dsft.console): set for the libraries not yet imported,
    switched off in those already imported."""
    import sys

    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(var, "1")
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def relaunch(num_processes: int) -> None:
    """Run this same command under `accelerate launch` on `num_processes` processes (DDP; the
    accelerate configs in recipes/accelerate/ cover FSDP and DeepSpeed), then exit with its code."""
    if num_processes <= 1 or "RANK" in os.environ:
        return
    import subprocess
    import sys

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            args.append(arg)
    # --multi_gpu starts N ranks through torchrun with or without GPUs (accelerate's --cpu starts one);
    # without CUDA dsft's Trainer arguments pick DDP over gloo (dsft.train.sft.cpu_args).
    # on one machine the ranks meet on a free port (accelerate's 0), so two runs on one machine do not collide
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
              "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
    raise typer.Exit(subprocess.call([*launch, "-m", "dsft", *args]))


def run_training(kind: str, recipe: Path, set_: list[str] | None, force: bool, resume: bool, resume_from: str | None,
                 num_processes: int) -> Any:
    """The body of every training command (`kind` is an objective's name, dsft.train.objective.OBJECTIVES):
    check the recipe, re-launch on N processes if asked, preflight (nothing is created when it fails),
    train or resume."""
    from dsft.config import load_recipe

    resolved = load_recipe(recipe, set_ or [], check_files=True)
    relaunch(num_processes)
    untested()
    from dsft.runs import lifecycle, run_dir
    from dsft.train.objective import objective
    from dsft.train.pipeline import preflight, resume_point, run

    goal = objective(kind)
    resuming = resume or bool(resume_from)
    output = Path(resolved.output_dir)
    # the output directory (in use? whose?) and the run to resume, before data is prepared or anything created
    lifecycle.check_output_dir(output, force, resuming, lifecycle.run_inputs(resolved))
    resume_point(resolved, resume, resume_from, dry=True)
    prepared = preflight(resolved, goal, force, check_output=False, resume=resuming)
    with run_dir.lock(output):  # a second process on this output_dir stops here, naming this one's pid
        # again under the lock: another process may have finished a run here since the preflight
        lifecycle.check_output_dir(output, force, resuming, lifecycle.run_inputs(resolved), locked=True)
        return run(prepared, goal, force, resume_point(resolved, resume, resume_from))


def untested() -> None:
    """One warning (main process) when an installed library is outside the minor versions dsft was checked on:
    their FutureWarnings, which would announce a change dsft relies on, go to run.log, not the console."""
    from dsft.compat import outside_tested
    from dsft.outputs import is_main

    lines = outside_tested()
    if lines and is_main():
        from dsft.console import say

        say(f"warning: outside the versions dsft was checked on: {'; '.join(lines)}; if training fails, install "
            "the tested ones: pip install -e . (pyproject.toml's pins)", stderr=True)


def training_command(kind: str, doc: str) -> Callable[..., None]:
    """The command training objective `kind` (`dsft sft`, `dsft dpo`, ...): the shared options, the shared
    body, and on the main rank the objective's result table (its `columns` and `table(result)`)."""

    def command(recipe_file: RecipeArg = None, recipe: RecipeOpt = None, set_: SetOpt = None, force: ForceOpt = False,
                resume: ResumeOpt = False, resume_from: ResumeFromOpt = None, num_processes: ProcessesOpt = 1) -> None:
        result = run_training(kind, one_recipe(recipe_file, recipe), set_, force, resume, resume_from, num_processes)
        from dsft.outputs import is_main

        if is_main():
            from rich.table import Table

            from dsft.console import run_log, say, show
            from dsft.runs import run_dir
            from dsft.train.objective import objective

            goal = objective(kind)
            table = Table(title=f"dsft {kind}: {result.run}")
            for i, column in enumerate(goal.columns):
                table.add_column(column, justify="left" if i == 0 else "right")
            for row in goal.table(result):
                table.add_row(*row)
            with run_log(run_dir.log(result.run)):
                show(table)
                say(f"adapter: {run_dir.adapter_dir(result.run)}")
                say(f"model card, curves and log: {run_dir.card(result.run)}, {run_dir.curves(result.run)}, "
                    f"{run_dir.log(result.run)}")

    command.__doc__, command.__name__ = doc, kind
    return errors_exit_2(command)


MAX_LINE, MAX_LINES = 1000, 40


def capped(lines: list[str]) -> list[str]:
    """An error's lines as printed: each cut to MAX_LINE characters and at most MAX_LINES of them, so that no
    input (a huge value, an expanded YAML alias) is echoed back whole."""
    out = [line if len(line) <= MAX_LINE else f"{line[:MAX_LINE]}... ({len(line) - MAX_LINE:,} more characters)"
           for line in lines[:MAX_LINES]]
    if len(lines) > MAX_LINES:
        out.append(f"... and {len(lines) - MAX_LINES} more")
    return out


def errors_exit_2(fn: F) -> F:
    """Report DsftError as one line per problem on stderr and exit 2; tracebacks only with DSFT_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DsftError as e:
            if os.environ.get("DSFT_DEBUG"):
                raise
            for line in capped(e.lines):
                typer.secho(f"{e.label}: {line}", err=True, fg=typer.colors.RED if e.label == "error" else None)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # a writer met a full disk, a read-only file system, a permission
            from dsft.outputs import os_error

            line = os_error(e)
            if line is None or os.environ.get("DSFT_DEBUG"):
                raise
            typer.secho(f"error: {line}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
