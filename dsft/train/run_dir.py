"""The run directory: refuse to clobber finished runs, record what was run, write atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from dsft.config.schema import BUILTIN_PREFIX, Recipe
from dsft.errors import DsftError
from dsft.train.dist import is_main

PACKAGES = ("dsft", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


CACHE_ENTRIES = {"routing", "plan.json"}  # written by `dsft experts` before a run; kept by --force


def check_output_dir(path: Path, force: bool, resume: bool = False) -> None:
    """Preflight: a run directory that holds anything but dsft's cache is only replaced with --force
    (or continued with --resume, checked by dsft.train.resume)."""
    if path.exists() and not path.is_dir():
        raise DsftError(f"output_dir: {path} is a file; choose a directory path")
    if resume or not is_main():  # other ranks would see the directory the main rank just created
        return
    if path.is_dir() and any(p.name not in CACHE_ENTRIES for p in path.iterdir()) and not force:
        status = read_status(path)
        what = f"a {status} run" if status else "files"
        hint = "pass --resume to continue it, --force to replace it," if status in ("running", "interrupted", "failed") \
            else "pass --force to replace it"
        raise DsftError(f"output_dir: {path} already holds {what}; {hint} or choose another output_dir")


CHECKPOINTS_KEPT = 2  # the Trainer's save_total_limit


def check_disk(path: Path, trainable_params: int) -> None:
    """Preflight: room for the kept checkpoints (fp32 weights and two Adam moments each, while a new one
    is written next to them) and the final adapter."""
    needed = trainable_params * (12 * (CHECKPOINTS_KEPT + 1) + 4)
    probe = next((p for p in (path, *path.resolve().parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DsftError(f"output_dir: {path} needs about {needed / 2**30:.1f} GiB free for checkpoints and the adapter, "
                        f"{probe} has {free / 2**30:.1f} GiB; free space or choose another output_dir")


def read_status(path: Path) -> str | None:
    try:
        return json.loads((path / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def create(path: Path, force: bool) -> None:
    """Make the run directory; with --force, clear a previous run but keep the routing-profile cache
    (profiles are keyed by model and data, so a stale one is never used)."""
    if force and path.is_dir():
        for entry in path.iterdir():
            if entry.name != "routing":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    path.mkdir(parents=True, exist_ok=True)


def resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe with every path made absolute, so merge/eval can read it from anywhere."""
    data = recipe.model_dump(mode="json")
    absolute = lambda p: str(Path(p).resolve())  # noqa: E731
    if not recipe.model.path.startswith(BUILTIN_PREFIX):
        data["model"]["path"] = absolute(recipe.model.path)
    data["data"]["train"] = [absolute(p) for p in recipe.data.train]
    data["data"]["eval"] = [absolute(p) for p in recipe.data.eval]
    if recipe.data.chat_template:
        data["data"]["chat_template"] = absolute(recipe.data.chat_template)
    data["output_dir"] = absolute(recipe.output_dir)
    return data


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_recipe(run: Path, recipe: Recipe) -> None:
    write_atomic(run / "recipe.yaml", yaml.safe_dump(resolved_recipe(recipe), sort_keys=False, allow_unicode=True))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    return {str(Path(p).resolve()): _sha256(Path(p)) for p in [*recipe.data.train, *recipe.data.eval]}


def run_info(recipe: Recipe, command: str, model: dict[str, Any], status: str, **extra: Any) -> dict[str, Any]:
    return {
        "command": command,
        "status": status,
        "argv": sys.argv,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {p: _version(p) for p in PACKAGES},
        "git_sha": _git_sha(),
        "data_sha256": data_sha256(recipe),
        "base_model": model,
        **extra,
    }


def write_run_info(run: Path, info: dict[str, Any]) -> None:
    write_atomic(run / "run.json", json.dumps(info, indent=2) + "\n")


@contextlib.contextmanager
def lifecycle(run: Path, recipe: Recipe, command: str, identity: dict[str, Any], force: bool,
              resumed_from: Path | None = None) -> Iterator[dict[str, Any]]:
    """Create the run directory with recipe.yaml and run.json (status `running`), or reopen it to
    resume; on a signal mark it `interrupted`, on any other error `failed`. The body marks it
    `complete` with `complete(...)`."""
    from dsft.train.resume import RunInterrupted

    info = run_info(recipe, command, identity, "running")
    if not is_main():
        yield info
        return
    if resumed_from is None:
        create(run, force)
        write_recipe(run, recipe)
    if resumed_from is not None:
        info["resumed_from"] = str(resumed_from)
    write_run_info(run, info)
    try:
        yield info
    except RunInterrupted as e:
        write_run_info(run, {**info, "status": "interrupted", "error": e.lines[0]})
        raise
    except BaseException as e:
        write_run_info(run, {**info, "status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise


def complete(run: Path, info: dict[str, Any], summary: dict[str, Any]) -> None:
    if is_main():
        write_run_info(run, {**info, "status": "complete", "summary": summary})


def publish(tmp: Path, final: Path) -> None:
    """Move a finished artifact directory into place in one rename."""
    if not is_main():
        return
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
