"""A run's life in its directory: the output directory checked before anything is made (ownership, the
command's inputs, a run to resume), created (or replaced, only when all of it is dsft's), its recipe and
run.json written (status, versions, inputs' sha256, the base's identity), ended as complete, failed or
interrupted (`RunInterrupted`), the adapter published by a rename, room for its checkpoints checked."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from dsft.config.schema import BUILTIN_PREFIX, Recipe, sections
from dsft.data.keys import file_sha256
from dsft.errors import DsftError
from dsft.locks import LOCK_NAME
from dsft.outputs import check_free, check_location, is_main, replace_dir, write_atomic
from dsft.runs.run_dir import (
    CACHE_ENTRIES, RECIPE, RESUMABLE, ROUTING, RUN_ENTRIES, RUN_JSON, TRACKERS, check_not_in_use, foreign_in, read_status,
    record_tracker_files, tracker_files, tree,
)


PACKAGES = ("dsft", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


class RunInterrupted(DsftError):
    """Training stopped on a signal after saving a checkpoint (not an error: its lines start with `stopped:`)."""

    label = "stopped"

    def __init__(self, signum: int, *lines: str) -> None:
        super().__init__(*lines)
        self.exit_code = 128 + signum


def run_inputs(recipe: Recipe) -> dict[str, list[Path]]:
    """The files a run reads, which its output_dir may never be, contain or replace."""
    inputs: dict[str, list[Path]] = {"base model (model.path)": [], "data file": [Path(p) for p in
                                                                          [*recipe.data.train, *recipe.data.eval]]}
    from dsft.hub import is_repo_id

    if not recipe.model.path.startswith(BUILTIN_PREFIX) and not is_repo_id(recipe.model.path):
        inputs["base model (model.path)"].append(Path(recipe.model.path))
    if recipe.data.chat_template:
        inputs["chat template (data.chat_template)"] = [Path(recipe.data.chat_template)]
    for name, section in sections(recipe).items():  # an objective's own inputs (its init_adapter)
        inputs.update(section.inputs(name))
    return inputs


def check_output_dir(path: Path, force: bool, resume: bool = False, inputs: dict[str, list[Path]] | None = None,
                     locked: bool = False) -> None:
    """Preflight: `path` may not be or hold an input, lie in a model checkpoint, or be in use; a run
    directory that holds anything but dsft's cache is only replaced with --force (or continued with
    --resume, checked by dsft.train.resume), and --force replaces only what dsft wrote. `locked`: this
    process holds the run's lock already (the check again under it)."""
    if resume and force:
        raise DsftError("--resume and --force: choose one (--resume continues the run, --force starts it again)")
    check_location(path, "output_dir", inputs)
    if not is_main():  # other ranks would see the directory the main rank just created
        return
    if not locked:
        check_not_in_use(path)
    if resume or not path.is_dir():
        return
    entries = sorted(p.name for p in path.iterdir() if p.name not in CACHE_ENTRIES)
    if not entries:
        return
    status = read_status(path)
    foreign = [found for name in entries for found in foreign_in(path, name)]
    if status is None or foreign:
        shown = ", ".join((foreign or entries)[:3])
        raise DsftError(f"output_dir: {path} holds files dsft did not write ({shown}); dsft replaces only its own runs, "
                        "even with --force: choose another output_dir")
    if not force:
        hint = "pass --resume to continue it, --force to replace it," if status in RESUMABLE else "pass --force to replace it"
        raise DsftError(f"output_dir: {path} already holds a {status} run; {hint} or choose another output_dir")


def check_disk(path: Path, trainable_params: int, kept: int = 2) -> None:
    """Preflight: room for the `kept` checkpoints (training.checkpoints_kept: fp32 weights and two Adam
    moments each, while a new one is written next to them) and the final adapter."""
    check_free(path, trainable_params * (12 * (kept + 1) + 4), "output_dir",
               f"output_dir: {path} needs about {{size}} free for checkpoints and the adapter")


def create(path: Path, force: bool) -> None:
    """Make the run directory; with --force, clear a previous run but keep the routing-profile cache
    (profiles are keyed by model and data, so a stale one is never used). Inside a tracker's directory only
    what the run's trackers wrote is removed (anything else stays, whatever the checks before said)."""
    if force and path.is_dir():
        written = tracker_files(path)
        for entry in path.iterdir():
            if entry.name in TRACKERS.values() and entry.is_dir() and not entry.is_symlink():
                _remove_written(entry, written)
            elif entry.name in RUN_ENTRIES and entry.name not in (ROUTING, LOCK_NAME, *TRACKERS.values()):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _remove_written(directory: Path, written: set[str]) -> None:
    """Remove the files a tracker wrote in `directory`, then its directories they leave empty."""
    paths = [rel for rel in tree(directory) if f"{directory.name}/{rel}" in written]
    for rel in sorted(paths, key=lambda r: -r.count("/")):  # deepest first
        p = directory / rel
        with contextlib.suppress(OSError):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()


def resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe with every path made absolute, so merge/eval can read it from anywhere."""
    data = recipe.model_dump(mode="json")
    absolute = lambda p: str(Path(p).resolve())  # noqa: E731
    from dsft.hub import is_repo_id

    if not recipe.model.path.startswith(BUILTIN_PREFIX) and not is_repo_id(recipe.model.path):  # a Hub id stays one
        data["model"]["path"] = absolute(recipe.model.path)
    data["data"]["train"] = [absolute(p) for p in recipe.data.train]
    if recipe.data.mix:  # a mixed file's share goes back into its entry, as the user wrote it
        data["data"]["train"] = [{"path": p, **share} if share else p
                                 for p, share in zip(data["data"]["train"], recipe.data.mix)]
    data["data"]["eval"] = [absolute(p) for p in recipe.data.eval]
    if recipe.data.chat_template:
        data["data"]["chat_template"] = absolute(recipe.data.chat_template)
    data["output_dir"] = absolute(recipe.output_dir)
    return data


def write_recipe(run: Path, recipe: Recipe) -> None:
    write_atomic(run / RECIPE, yaml.safe_dump(resolved_recipe(recipe), sort_keys=False, allow_unicode=True))


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def data_sha256(recipe: Recipe) -> dict[str, str]:
    return {str(Path(p).resolve()): file_sha256(Path(p)) for p in [*recipe.data.train, *recipe.data.eval]}


def run_info(recipe: Recipe, command: str, model: dict[str, Any], status: str, **extra: Any) -> dict[str, Any]:
    return {
        "command": command,
        "status": status,
        "argv": sys.argv,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {p: _version(p) for p in PACKAGES},
        "git_sha": _git_sha(),
        "data_sha256": data_sha256(recipe),
        **({"data_sources": recipe.data.sources} if recipe.data.sources else {}),  # Hub datasets: repo, split, commit
        "base_model": model,
        **extra,
    }


def write_run_info(run: Path, info: dict[str, Any]) -> None:
    write_atomic(run / RUN_JSON, json.dumps(info, indent=2) + "\n")


@contextlib.contextmanager
def lifecycle(run: Path, recipe: Recipe, command: str, identity: dict[str, Any], force: bool,
              resumed_from: Path | None = None) -> Iterator[dict[str, Any]]:
    """Create the run directory with recipe.yaml and run.json (status `running`), or reopen it to
    resume; on a signal mark it `interrupted`, on any other error `failed`. The body marks it
    `complete` with `complete(...)`."""
    info = run_info(recipe, command, identity, "running")
    if not is_main():
        yield info
        return
    started = time.time() - 1  # file times are coarser on some file systems
    if resumed_from is None:
        create(run, force)
        write_recipe(run, recipe)
    if resumed_from is not None:
        info["resumed_from"] = str(resumed_from)
    write_run_info(run, info)
    try:
        yield info
    except RunInterrupted as e:
        _record_end(run, {**info, "status": "interrupted", "error": e.lines[0]})
        raise
    except BaseException as e:
        _record_end(run, {**info, "status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        record_tracker_files(run, list(recipe.training.report_to), started)


def _record_end(run: Path, info: dict[str, Any]) -> None:
    """Record how the run ended where the disk still lets us (a full disk may not); a run.json left
    `running` with no process holding the lock reads as stopped all the same (check_usable)."""
    with contextlib.suppress(OSError):
        write_run_info(run, info)


def complete(run: Path, info: dict[str, Any], summary: dict[str, Any]) -> None:
    if is_main():
        write_run_info(run, {**info, "status": "complete", "summary": summary})


def publish(tmp: Path, final: Path) -> None:
    """Move a finished artifact directory into place in one rename."""
    if not is_main():
        return
    replace_dir(tmp, final)


# ---------------------------------------------------------------- checkpoints

