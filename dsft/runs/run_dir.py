"""The run directory: refuse to clobber finished runs, record what was run, write atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from dsft.errors import DsftError
from dsft.locks import LOCK_NAME, OutputLock, holder
from dsft.outputs import is_main, read_json, write_atomic



# The layout of a run directory; every command reaches its files through these and the functions below.
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
    return [f"{name}/{rel}" for rel in tree(run / name) if f"{name}/{rel}" not in written] or \
        ([] if (run / name).is_dir() and not (run / name).is_symlink() else [name])


def tree(directory: Path) -> list[str]:
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
            for rel in tree(directory):
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


def recipe_file(run: Path) -> Path:
    """The run's own recipe.yaml (a directory without one holds no dsft run)."""
    return Path(run) / RECIPE


def is_run(path: Path) -> bool:
    return recipe_file(path).is_file()


def info(run: Path) -> dict[str, Any]:
    """run.json, or {} where there is none yet."""
    return read_run_json(run) if (Path(run) / RUN_JSON).is_file() else {}


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
