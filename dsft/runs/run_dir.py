"""The run directory: refuse to clobber finished runs, record what was run, write atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from dsft.config.schema import BUILTIN_PREFIX, Recipe, sections
from dsft.data.prepared import file_sha256
from dsft.errors import DsftError
from dsft.outputs import (
    LOCK_NAME, OutputLock, check_free, check_location, holder, is_main, read_json, replace_dir,
    write_atomic,
)

PACKAGES = ("dsft", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


# The layout of a run directory; every command reaches its files through these (or RunDir).
ADAPTER, CHECKPOINTS, METRICS, RECIPE, RUN_JSON = "adapter", "checkpoints", "metrics.jsonl", "recipe.yaml", "run.json"
LOG, CURVES, CARD, PLAN, EVAL, EVAL_PLOT = "run.log", "curves.png", "README.md", "plan.json", "eval.json", "eval.png"
COMPLETIONS = "completions.jsonl"  # GRPO: sampled prompts, completions and their rewards per logged step
CHECKPOINT_EVAL, CHECKPOINT_EVAL_PLOT = "eval-checkpoint.json", "eval-checkpoint.png"  # `dsft eval` of a checkpoint
COMPARISON, COMPARISON_PLOT = "comparison.json", "comparison.png"  # `dsft eval --against`: this run vs another
ROUTING = "routing"
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlruns", "wandb": "wandb"}
TRACKER_FILES = ".dsft-tracker-files.json"  # what the run's trackers wrote in their directories (relative paths)

CACHE_ENTRIES = {ROUTING, PLAN, LOCK_NAME}  # written by `dsft experts` before a run; kept by --force
# Everything a run directory can hold that dsft wrote (atomic writes' temporaries included). --force
# replaces a run only when it holds nothing else: a user's own file in it stops the replacement.
_STAGED = (ADAPTER, RECIPE, RUN_JSON, EVAL, PLAN, CURVES, CARD, EVAL_PLOT, CHECKPOINT_EVAL, CHECKPOINT_EVAL_PLOT,
           COMPARISON, COMPARISON_PLOT)  # written beside, then renamed
RUN_ENTRIES = CACHE_ENTRIES | {CHECKPOINTS, METRICS, COMPLETIONS, LOG, TRACKER_FILES, *_STAGED,
                               *(f".{name}.tmp" for name in (*_STAGED, TRACKER_FILES)), *TRACKERS.values()}
RESUMABLE = ("running", "interrupted", "failed")
MARKER = "dsft-complete.json"  # in a checkpoint: written last, with every file's size (a checkpoint without it is torn)
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


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


def check_not_in_use(path: Path) -> None:
    """No dsft process holds the run directory's lock (a run training there)."""
    pid = holder(path)
    if pid is not None:
        raise DsftError(f"output_dir: {path} is in use by a running dsft process (pid {pid}); wait for it to finish, "
                        "stop it, or choose another output_dir")


def lock(path: Path) -> contextlib.AbstractContextManager:
    """One process per run directory (the main rank's); creates the directory."""
    return OutputLock(path, "output_dir") if is_main() else contextlib.nullcontext()


def check_usable(run: Path, force: bool, command: str) -> str | None:
    """Before eval, chat or merge read a run: not while it trains (always refused); a failed or
    interrupted run only with --force. Returns the run's status."""
    pid = holder(run)
    if pid is not None:
        raise DsftError(f"--adapter {run}: the run is still training (dsft process {pid}); wait for it to finish or "
                        "stop it first")
    info = read_run_json(run) if (run / "run.json").is_file() else {}
    status = info.get("status")
    if status in RESUMABLE and not force:
        state = "was stopped before it finished" if status == "running" else f"is {status}"
        kind = info.get("command", "sft")
        raise DsftError(f"--adapter {run}: the run {state}; resume it with `dsft {kind} --recipe {run / 'recipe.yaml'} "
                        f"--resume`, or pass --force to {command} its adapter as it is")
    return status


def adapter_dir(run: Path) -> Path:
    return Path(run) / ADAPTER


def adapter_tmp(run: Path) -> Path:
    return Path(run) / f".{ADAPTER}.tmp"


def checkpoints(run: Path) -> Path:
    return Path(run) / CHECKPOINTS


def metrics(run: Path) -> Path:
    return Path(run) / METRICS


def completions(run: Path) -> Path:
    return Path(run) / COMPLETIONS


def step_logs(run: Path) -> list[Path]:
    """The JSONL files a run appends a row to per logged step (each row has its `step`): a resumed run trims
    them to its checkpoint's step first."""
    return [metrics(run), completions(run)]


CARD_MARK = "<!-- dsft model card: rewritten by every run -->"


def is_card(path: Path) -> bool:
    """A README.md dsft wrote (a user's own README.md in a run directory is theirs, never replaced)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline().strip() == CARD_MARK
    except OSError:
        return False


def foreign_in(run: Path, name: str) -> list[str]:
    """What of entry `name` of run directory `run` dsft did not write: [] when it is all dsft's; [name] for an
    entry that is not a run-dir name, a README.md that is not dsft's card, or a tracker directory of a tracker
    the run's recipe.yaml does not report to; inside a tracker directory of the run's, the paths its trackers
    did not write (tracker_files), e.g. `tensorboard/my-notes.txt`."""
    if name not in RUN_ENTRIES:
        return [name]
    if name == CARD:
        return [] if is_card(run / name) else [name]
    trackers = [t for t, directory in TRACKERS.items() if directory == name]
    if not trackers:
        return []
    try:
        recorded = yaml.safe_load((run / RECIPE).read_text(encoding="utf-8"))["training"].get("report_to") or []
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return [name]
    if trackers[0] not in recorded:
        return [name]
    written = tracker_files(run)
    return [f"{name}/{rel}" for rel in _tree(run / name) if f"{name}/{rel}" not in written] or \
        ([] if (run / name).is_dir() and not (run / name).is_symlink() else [name])


def _tree(directory: Path) -> list[str]:
    """Every file, link and directory under `directory`, relative to it (links are not followed)."""
    out = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        rel = Path(root).relative_to(directory)
        out += [str(rel / d) for d in dirs] + [str(rel / f) for f in files]
    return sorted(out)


def tracker_files(run: Path) -> set[str]:
    """The paths (`tensorboard/events...`) the run's trackers wrote, as record_tracker_files noted them."""
    try:
        files = json.loads((Path(run) / TRACKER_FILES).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def record_tracker_files(run: Path, trackers: list[str], since: float) -> None:
    """Note what the run's trackers have written so far in their directories (files modified since the run
    started, `since`), added to what was noted before; --force later removes only these."""
    if not trackers or not is_main():
        return
    noted = tracker_files(run)
    for tracker in trackers:
        directory = tracker_dir(run, tracker)
        if directory.is_dir() and not directory.is_symlink():
            for rel in _tree(directory):
                path = directory / rel
                with contextlib.suppress(OSError):
                    if path.is_dir() or path.lstat().st_mtime >= since:
                        noted.add(f"{directory.name}/{rel}")
    with contextlib.suppress(OSError):
        write_atomic(Path(run) / TRACKER_FILES, json.dumps({"files": sorted(noted)}, indent=1) + "\n")


def log(run: Path) -> Path:
    return Path(run) / LOG


def curves(run: Path) -> Path:
    return Path(run) / CURVES


def card(run: Path) -> Path:
    return Path(run) / CARD


def tracker_dir(run: Path, tracker: str) -> Path:
    """Where a `training.report_to` tracker writes inside the run (tensorboard events, mlflow's file store,
    wandb's offline runs)."""
    return Path(run) / TRACKERS[tracker]


def run_of_checkpoint(path: Path) -> Path | None:
    """The run directory a Trainer checkpoint (RUN/checkpoints/checkpoint-N) belongs to, or None."""
    path = Path(os.path.abspath(path))
    if path.name.startswith("checkpoint-") and path.parent.name == CHECKPOINTS and (path.parent.parent / RECIPE).is_file():
        return path.parent.parent
    return None


def refuse_checkpoint(path: Path, key: str = "--adapter") -> None:
    """A training checkpoint given where a run or its adapter is meant: say what to pass instead."""
    run = run_of_checkpoint(path)
    if run is not None:
        raise DsftError(f"{key} {path}: a training checkpoint of the run {run} (the state to resume from, without the "
                        f"adapter's metadata): pass {key} {run} for the run's adapter, or continue training from it with "
                        f"`dsft {read_command(run)} --recipe {run / RECIPE} --resume-from {path}`")


def read_command(run: Path) -> str:
    """The command that trained a run (`sft`, `dpo`, ...), from its run.json; `sft` when unreadable."""
    try:
        info = json.loads((Path(run) / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "sft"
    return info.get("command", "sft") if isinstance(info, dict) else "sft"


def checkpoint_step(checkpoint: Path) -> int:
    """The step of a Trainer checkpoint directory (`checkpoint-N`)."""
    return int(Path(checkpoint).name.split("-")[1])


class RunDir:
    """A dsft run directory: its paths, its recipe read back through the schema, run.json and status,
    and the lock and ownership rules (check_output_dir / check_usable) that guard it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def adapter(self) -> Path:
        return adapter_dir(self.path)

    @property
    def checkpoints(self) -> Path:
        return checkpoints(self.path)

    @property
    def metrics(self) -> Path:
        return metrics(self.path)

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE

    def is_run(self) -> bool:
        return self.recipe_file.is_file()

    def recipe(self) -> Recipe:
        from dsft.config.load import load_run_recipe

        return load_run_recipe(self.path)

    def info(self) -> dict[str, Any]:
        return read_run_json(self.path) if (self.path / RUN_JSON).is_file() else {}

    def status(self) -> str | None:
        return read_status(self.path)

    def holder(self) -> int | None:
        return holder(self.path)

    def lock(self) -> contextlib.AbstractContextManager:
        return lock(self.path)

    def check_usable(self, force: bool, command: str) -> str | None:
        return check_usable(self.path, force, command)


def check_disk(path: Path, trainable_params: int, kept: int = 2) -> None:
    """Preflight: room for the `kept` checkpoints (training.checkpoints_kept: fp32 weights and two Adam
    moments each, while a new one is written next to them) and the final adapter."""
    check_free(path, trainable_params * (12 * (kept + 1) + 4), "output_dir",
               f"output_dir: {path} needs about {{size}} free for checkpoints and the adapter")


def run_of(path: Path) -> Path:
    """A run directory given as itself or as its adapter/ (what `merge` and `export` accept too)."""
    if path.name == ADAPTER and (path / "adapter_config.json").is_file() and (path.parent / RECIPE).is_file():
        return path.parent
    return path


def adapter_of(path: Path) -> Path:
    """The adapter directory of a run directory (its adapter/), or `path` itself (an adapter directory)."""
    return path / ADAPTER if (path / ADAPTER / "adapter_config.json").is_file() else path


def read_run_json(run: Path) -> dict[str, Any]:
    return read_json(run / RUN_JSON, "the run directory is damaged: train it again with --force or restore run.json")


def read_status(path: Path) -> str | None:
    """The status dsft recorded, or None where there is no readable run.json of dsft's."""
    try:
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("status") if isinstance(info, dict) else None


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
    paths = [rel for rel in _tree(directory) if f"{directory.name}/{rel}" in written]
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

def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint: no completion marker, or files missing or of another size
    than when it was completed (truncated or overwritten). None when it is intact."""
    marker = checkpoint / MARKER
    if not marker.is_file():
        return "never completed"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable completion marker"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or truncated"
    return None


def latest_checkpoint(checkpoints: Path, quiet: bool = False) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are reported and skipped."""
    found = sorted(((int(m.group(1)), p) for p in checkpoints.glob("checkpoint-*") if (m := CHECKPOINT_NAME.match(p.name))),
                   reverse=True)
    for _, path in found:
        problem = damage(path)
        if problem is None:
            return path
        if not quiet:
            print(f"warning: skipping {path}: {problem}; using an older checkpoint", file=sys.stderr)
    return None


def describe_checkpoint(checkpoint: Path) -> str:
    """`checkpoint-10 (step 10 of 40) of the interrupted run RUN`: how the commands that read a checkpoint name it."""
    run = run_of_checkpoint(checkpoint)
    status = read_status(run) if run else None
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        steps = f" (step {int(state.get('global_step', 0))} of {int(state.get('max_steps', 0))})"
    except (OSError, ValueError, TypeError, AttributeError):
        steps = ""
    stopped = {"running": "stopped", "interrupted": "interrupted", "failed": "failed", "complete": "complete"}.get(status or "", "")
    return f"{checkpoint.name}{steps} of the {stopped + ' ' if stopped else ''}run {run}"


def adapter_source(path: Path, key: str = "--adapter", command: str = "read") -> tuple[Path | None, Path, Path | None]:
    """What `KEY PATH` names for a command that reads an adapter (eval, chat, merge, export): (its run directory
    or None, the adapter directory to read, the checkpoint when PATH is one of a run's checkpoints). The same
    line for a run still training, whatever the command; a run that never finished names its last checkpoint."""
    path = Path(path)
    run = run_of_checkpoint(path)
    if run is not None:
        pid = holder(run)
        if pid is not None:
            raise DsftError(f"{key} {path}: the run {run} is still training (dsft process {pid}); wait for it to finish "
                            "or stop it first")
        problem = damage(path)
        if problem is not None:
            raise DsftError(f"{key} {path}: the checkpoint is damaged ({problem}); pass an intact one, e.g. "
                            f"{latest_checkpoint(run / CHECKPOINTS, quiet=True) or 'none is left: train the run again'}")
        if not (path / "dsft_adapter.json").is_file():
            raise DsftError(f"{key} {path}: a checkpoint saved by a dsft before 2026-12-07, without its adapter's metadata; "
                            f"resume the run (`dsft {read_command(run)} --recipe {run / RECIPE} --resume-from {path}`) "
                            f"and {command} the finished run")
        return run, path, path
    if path.name == ADAPTER and (path / "adapter_config.json").is_file() and (path.parent / RECIPE).is_file():
        path = path.parent
    if (path / ADAPTER / "adapter_config.json").is_file():
        return path, path / ADAPTER, None
    if (path / RECIPE).is_file() and (path / RUN_JSON).is_file():  # a run directory (dsft writes both at its start)
        pid = holder(path)
        if pid is not None:
            raise DsftError(f"{key} {path}: the run is still training (dsft process {pid}); wait for it to finish or "
                            "stop it first")
        if not (path / ADAPTER / "adapter_config.json").is_file():
            last = latest_checkpoint(path / CHECKPOINTS, quiet=True)
            how = f"`dsft {read_command(path)} --recipe {path / RECIPE} --resume`"
            raise DsftError(f"{key} {path}: the run has no adapter/ (it stopped before it finished); "
                            + (f"{command} its last checkpoint with {key} {last}, or resume it with {how}" if last else
                               f"it saved no checkpoint: train it again, or resume it with {how}"))
        return path, path / ADAPTER, None
    if (path / "adapter_config.json").is_file():
        return (path.parent if (path.parent / RECIPE).is_file() else None), path, None
    if not path.exists():
        raise DsftError(f"{key} {path}: no such directory; give a dsft run directory or an adapter directory")
    raise DsftError(f"{key} {path}: neither a dsft run directory nor an adapter directory (no adapter_config.json)")
