"""Never lose a run: complete-checkpoint markers, resume, and a clean stop on SIGINT/SIGTERM.

The Trainer writes `checkpoint-N` in place; it calls `on_save` once the checkpoint (adapter,
optimizer, scheduler, RNG states, trainer state with the data position) is fully written, and dsft
then writes `checkpoint-N/dsft-complete.json`. Resume uses the newest checkpoint with that marker, so a
kill during a save never resumes from a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dsft.errors import DsftError
from dsft.outputs import write_atomic
from dsft.runs.lifecycle import RunInterrupted
from dsft.runs.run_dir import CHECKPOINT_NAME, MARKER, damage, latest_checkpoint

RESUME_FREE = {"data.num_proc"}  # recipe keys a resume may change: they change no result
# Set by the `dsft` entry point (dsft.cli.app.main): only a dsft process takes over SIGINT / SIGTERM, not a
# library caller or pytest (whose Ctrl-C must stop the session, not fail one test).
SIGNALS_ENV = "DSFT_HANDLE_SIGNALS"


def resume_command(command: str, run: Path) -> str:
    """The command line that continues this run: the user's own, with --resume (and without --force), when
    this process is the `dsft` command; else the run's recipe with --resume."""
    import shlex

    argv = list(sys.argv)
    if argv and (Path(argv[0]).name in ("dsft", "__main__.py") or argv[0] == "-m"):
        words = [w for w in argv[1:] if w != "--force"]
        words = [*words, "--resume"] if "--resume" not in words and not any(w.startswith("--resume-from") for w in words) else words
        return "dsft " + " ".join(shlex.quote(w) for w in words)
    return f"dsft {command} --recipe {shlex.quote(str(run / 'recipe.yaml'))} --resume"


class CheckpointMarker(TrainerCallback):
    """After the Trainer saved a checkpoint: the adapter's metadata beside its weights (so that eval, chat,
    merge and export read a checkpoint as an adapter directory), then the completion marker, last."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self.metadata = metadata

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's files (its RNG state, its optimizer shard) are written before they are sized
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if self.metadata is not None:
                from dsft.adapters.metadata import write_metadata

                write_metadata(folder, self.metadata)
            sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
            write_atomic(folder / MARKER, json.dumps({"step": state.global_step, "epoch": state.epoch,
                                                      "processes": args.world_size, "files": sizes}))


class GracefulStop(TrainerCallback):
    """First SIGINT/SIGTERM: finish the current step, save a checkpoint, stop. Second: exit at once
    (the last complete checkpoint is untouched: only marked checkpoints are resumed from)."""

    def __init__(self, run: Path | None = None) -> None:
        self.signum: int | None = None
        self.step = 0
        self.run = run
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self._mark_stopped(signum)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(signal again to stop at once)", file=sys.stderr, flush=True)

    def _mark_stopped(self, signum: int) -> None:
        """run.json says how the run ended before the process exits at once (it would otherwise read `running`)."""
        if self.run is None:
            return
        path = self.run / "run.json"
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            info.update(status="interrupted", error=f"{signal.Signals(signum).name} twice: stopped at once during step "
                        f"{self.step + 1}; resume from the last checkpoint")
            write_atomic(path, json.dumps(info, indent=2) + "\n")
        except (OSError, ValueError, AttributeError):
            pass

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if os.environ.get(SIGNALS_ENV) != "1":
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def prepare_resume(run: Path, recipe_data: dict[str, Any], explicit: str | None, dry: bool = False) -> Path:
    """Check that `run` can be resumed with this recipe and return the checkpoint to resume from; unless
    `dry` (the preflight, which changes nothing), remove the damaged checkpoints after it."""
    from dsft.config.load import read_yaml
    from dsft.runs import run_dir

    status = run_dir.info(run).get("status")
    if status is None:
        raise DsftError(f"--resume: {run} holds no dsft run to resume; start it without --resume")
    if status == "complete":
        raise DsftError(f"--resume: the run in {run} is already complete; pass --force to train it again")
    if not run_dir.is_run(run):
        raise DsftError(f"--resume: {run} has no recipe.yaml, so the run cannot be checked; start again with --force")
    saved = read_yaml(run_dir.recipe_file(run), "run recipe")
    changed = sorted(f"{s}.{k}" for s in saved if isinstance(saved[s], dict)
                     for k in set(saved[s]) | set(recipe_data.get(s) or {}) if saved[s].get(k) != (recipe_data.get(s) or {}).get(k)
                     and f"{s}.{k}" not in RESUME_FREE)
    if changed:
        raise DsftError(f"--resume: the recipe changed since the run started ({', '.join(changed[:5])}); "
                        "resume with the same recipe, or start again with --force")
    check_inputs(run, recipe_data)
    if explicit:
        owned = Path(explicit).resolve().parent == run_dir.checkpoints(run).resolve()
        if not owned:
            raise DsftError(f"--resume-from {explicit}: not a checkpoint of the run in {run} (its checkpoints are in "
                            f"{run_dir.checkpoints(run)}); pick one of those, or use --resume for the latest")
        problem = damage(Path(explicit))
        if problem:
            raise DsftError(f"--resume-from {explicit}: {problem}; pick another checkpoint or use --resume")
        check_weights(Path(explicit), "--resume-from")
        return Path(explicit)
    checkpoint = latest_checkpoint(run_dir.checkpoints(run), quiet=dry)
    if checkpoint is None:
        raise DsftError(f"--resume: no complete checkpoint in {run_dir.checkpoints(run)}; start again with --force")
    check_weights(checkpoint, "--resume")
    step = int(checkpoint.name.split("-")[1])
    for later in [] if dry else run_dir.checkpoints(run).glob("checkpoint-*"):  # damaged or half-written: trained again
        m = CHECKPOINT_NAME.match(later.name)
        if m and int(m.group(1)) > step:
            shutil.rmtree(later, ignore_errors=True)
    return checkpoint


def check_weights(checkpoint: Path, key: str) -> None:
    """The adapter weights a checkpoint holds are finite: training that diverged is not continued."""
    from dsft.adapters.weights import WEIGHTS, check_finite

    if (checkpoint / WEIGHTS).is_file():
        try:
            check_finite(checkpoint / WEIGHTS)
        except DsftError as e:
            raise DsftError(f"{key}: {e.lines[0].split('; ')[0]}: training had diverged when {checkpoint.name} was saved; "
                            "resume from an earlier checkpoint (--resume-from) or start again with a lower training.lr "
                            "(--force)") from None


def check_inputs(run: Path, recipe_data: dict[str, Any]) -> None:
    """What the run trained on is still there unchanged: every data file's sha256 as run.json recorded it,
    and the base model's identity (architecture and weights fingerprint)."""
    from dsft.models.identity import check_base
    from dsft.models.load import resolve_model_path
    from dsft.data.keys import file_sha256

    from dsft.runs import run_dir

    info = run_dir.info(run)
    recorded = info.get("data_sha256") or {}
    for name, sha in recorded.items():
        path = Path(name)
        if not path.is_file():
            raise DsftError(f"--resume: data file {name} the run trained on is gone; restore it, or start again with --force")
        if file_sha256(path) != sha:
            raise DsftError(f"--resume: data file {name} changed since the run started (its sha256 differs from "
                            f"{run / 'run.json'}); restore it, or start again with --force")
    check_base(info.get("base_model"), resolve_model_path(recipe_data["model"]["path"], recipe_data["model"].get("revision")),
               "--resume: model.path", force_hint=None)


def saved_progress(checkpoint: Path) -> tuple[int, int]:
    """(the step a checkpoint was saved at, the run's total steps) from its trainer_state.json."""
    from dsft.outputs import read_json

    state = read_json(checkpoint / "trainer_state.json", "the checkpoint is damaged: resume from another one")
    return int(state.get("global_step", 0)), int(state.get("max_steps", 0))


def _say_if_other_processes(checkpoint: Path, processes: int) -> None:
    """A run resumed on another number of processes goes on with another global batch (the sharded optimizer state
    of training.parallel is re-split by torch.distributed.checkpoint): said in one line, not refused (a lost node)."""
    from dsft.console import say
    from dsft.outputs import read_json

    saved = read_json(checkpoint / MARKER, "the checkpoint is damaged: resume from another one").get("processes")
    if saved and saved != processes:
        say(f"warning: {checkpoint.name} was saved by {saved} processes and this run has {processes}: the global "
            f"batch is now micro_batch_size x grad_accum x {processes}, so the steps from here differ from an "
            f"uninterrupted run's", stderr=True)


def train(trainer: Any, run: Path, command: str, checkpoint: Path | None, metadata: dict[str, Any] | None = None) -> None:
    """trainer.train with completion markers and graceful stop; raises RunInterrupted after a signal. A
    checkpoint saved at the run's last step completes the run without training: the Trainer would train one
    step past max_steps when max_steps does not end an epoch (it skips the finished steps of the current
    epoch and checks the limit only after the next one)."""
    from dsft.console import say
    from dsft.outputs import is_main

    if checkpoint is not None:
        step, total = saved_progress(checkpoint)
        if is_main():
            say(f"resuming {run} from {checkpoint.name}: step {step} of {total}"
                + (" (its last: the run completes without training)" if total and step >= total else ""))
            _say_if_other_processes(checkpoint, trainer.args.world_size)
        if total and step >= total:
            from transformers.trainer_callback import TrainerState

            trainer._load_from_checkpoint(str(checkpoint))  # the weights as trained; optimizer state is not needed
            trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
            return
    stop = GracefulStop(run if is_main() else None)
    trainer.add_callback(CheckpointMarker(metadata))
    trainer.add_callback(stop)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stop.signum is not None:
        raise RunInterrupted(stop.signum, f"interrupted at step {stop.step}: checkpoint saved in {run / 'checkpoints'}",
                             f"resume with: {resume_command(command, run)}")
