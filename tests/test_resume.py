"""Never lose a run: kill -9 and --resume, SIGTERM, damaged checkpoints, refusals."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dsft.runs.run_dir import MARKER, latest_checkpoint

STEPS = 24


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _recipe(make_recipe, name: str, out: Path) -> Path:
    return make_recipe(name, rows=32, output_dir=str(out), adapter={"routed_experts": {1: [0, 3]}},
                       training={"max_steps": STEPS, "save_steps": 5, "logging_steps": 1, "micro_batch_size": 4,
                                 "scheduler": "cosine", "warmup_ratio": 0.1})


def _start(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dsft", "sft", "--recipe", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, min_step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        markers = list((run / "checkpoints").glob(f"checkpoint-*/{MARKER}"))
        if any(int(m.parent.name.split("-")[1]) >= min_step for m in markers):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before a checkpoint: {proc.stdout.read()}")
        time.sleep(0.02)
    pytest.fail("no checkpoint in time")


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted(make_recipe, cli, tmp_path: Path) -> None:
    """A real kill -9 mid-run: the run refuses to start over without --resume, resumes and ends as the uninterrupted
    run; a copy with its newest checkpoint damaged resumes from the one before."""
    whole = _recipe(make_recipe, "whole.yaml", tmp_path / "whole")
    assert cli("sft", "--recipe", whole).exit_code == 0
    killed_recipe = _recipe(make_recipe, "killed.yaml", tmp_path / "killed")
    proc = _start(killed_recipe)
    _wait_for_checkpoint(tmp_path / "killed", proc, min_step=10)
    proc.kill()
    proc.wait()
    assert json.loads((tmp_path / "killed/run.json").read_text())["status"] == "running"
    _damaged_checkpoint_falls_back_to_the_previous(tmp_path / "killed", whole, cli, tmp_path / "dmg")
    refused = cli("sft", "--recipe", killed_recipe)
    assert refused.exit_code == 2 and "pass --resume to continue it" in refused.output
    resumed = cli("sft", "--recipe", killed_recipe, "--resume")
    assert resumed.exit_code == 0, resumed.output
    info = json.loads((tmp_path / "killed/run.json").read_text())
    assert info["status"] == "complete" and "checkpoint-" in info["resumed_from"]
    start = int(Path(info["resumed_from"]).name.split("-")[1])
    assert start >= 10
    whole_losses, resumed_losses = _losses(tmp_path / "whole"), _losses(tmp_path / "killed")
    assert sorted(resumed_losses) == sorted(whole_losses)
    for step in range(start + 1, STEPS + 1):
        assert resumed_losses[step] == pytest.approx(whole_losses[step], rel=1e-4, abs=1e-6), step


def _damaged_checkpoint_falls_back_to_the_previous(killed: Path, recipe: Path, cli, run: Path) -> None:
    """A copy of the killed run, its newest complete checkpoint's weights cut in half: --resume skips it, says so,
    and continues from the one before."""
    shutil.copytree(killed, run)
    again = run.parent / "dmg.yaml"
    again.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "output_dir": str(run)}))
    (run / "recipe.yaml").write_text(yaml.safe_dump({**yaml.safe_load((run / "recipe.yaml").read_text()),
                                                     "output_dir": str(run)}, sort_keys=False))
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    newest = [c for c in checkpoints if (c / MARKER).is_file()][-1]
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = cli("sft", "--recipe", again, "--resume")
    assert result.exit_code == 0, result.output
    assert f"warning: skipping {newest}: adapter_model.safetensors is missing or truncated" in result.output
    info = json.loads((run / "run.json").read_text())
    assert int(Path(info["resumed_from"]).name.split("-")[1]) < int(newest.name.split("-")[1])
    # the console says where it resumed: the run, the checkpoint and its step
    step = Path(info["resumed_from"]).name.split("-")[1]
    assert f"resuming {run} from checkpoint-{step}: step {step} of " in " ".join(result.output.split())


def test_sigterm_saves_a_loadable_checkpoint(make_recipe, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM to a training process (this one, with the handlers `dsft` installs): the step ends, a checkpoint is
    saved, the run says how to resume and exits 128 + 15."""
    import os
    import threading

    from dsft.adapters.lora import load_lora
    from dsft.config.schema import ModelSection
    from dsft.models.load import load_model, resolve_model_path
    from dsft.train.resume import SIGNALS_ENV, GracefulStop

    monkeypatch.setenv(SIGNALS_ENV, "1")
    recipe = _recipe(make_recipe, "term.yaml", tmp_path / "term")
    monkeypatch.setattr(sys, "argv", ["dsft", "sft", "--recipe", str(recipe)])  # the resume line repeats the command

    def terminate() -> None:  # once a checkpoint exists, and only to dsft's handler (pytest's would end the worker)
        deadline = time.time() + 120
        while time.time() < deadline:
            handler = signal.getsignal(signal.SIGTERM)
            if list((tmp_path / "term/checkpoints").glob(f"checkpoint-*/{MARKER}")) and \
                    isinstance(getattr(handler, "__self__", None), GracefulStop):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    sender = threading.Thread(target=terminate, daemon=True)
    sender.start()
    result = cli("sft", "--recipe", recipe)
    sender.join()
    out = result.output
    assert result.exit_code == 128 + signal.SIGTERM, out
    assert "SIGTERM: stopping after this step" in out
    stopped = [line for line in out.splitlines() if line.startswith(("stopped:", "error:"))]
    assert stopped == [f"stopped: interrupted at step {stopped[0].split()[4].rstrip(':')}: checkpoint saved in "
                       f"{tmp_path / 'term/checkpoints'}", f"stopped: resume with: dsft sft --recipe {recipe} --resume"], out
    info = json.loads((tmp_path / "term/run.json").read_text())
    assert info["status"] == "interrupted"
    last = latest_checkpoint(tmp_path / "term/checkpoints")
    assert last is not None and int(last.name.split("-")[1]) < STEPS
    assert signal.getsignal(signal.SIGTERM) is not None and not isinstance(
        getattr(signal.getsignal(signal.SIGTERM), "__self__", None), GracefulStop)  # the handlers are given back
    base = load_model(ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32"),
                      resolve_model_path("builtin:tiny-deepseek-v3"))
    assert not (tmp_path / "term/adapter").exists()  # no final adapter from an interrupted run
    (last / "dsft_adapter.json").write_text(json.dumps({"routed_experts": {"experts": {"1": [0, 3]}}}))
    load_lora(base, str(last))


def test_resume_refusals(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(training={"max_steps": 2})
    assert "holds no dsft run to resume" in cli("sft", "--recipe", recipe, "--resume").output
    assert cli("sft", "--recipe", recipe).exit_code == 0
    done = cli("sft", "--recipe", recipe, "--resume")
    assert done.exit_code == 2 and "already complete; pass --force" in done.output
    info = json.loads((tmp_path / "run/run.json").read_text())
    (tmp_path / "run/run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    changed = cli("sft", "--recipe", recipe, "--resume", "--set", "training.lr=0.5")
    assert changed.exit_code == 2 and "the recipe changed since the run started (training.lr)" in changed.output
    import shutil

    shutil.rmtree(tmp_path / "run/checkpoints")
    none = cli("sft", "--recipe", recipe, "--resume")
    assert none.exit_code == 2 and "no complete checkpoint" in none.output


def test_a_second_signal_records_the_run_as_interrupted_before_exiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second SIGINT/SIGTERM exits at once (os._exit), and run.json says so first instead of `running`."""
    import json
    import signal

    from dsft.train import resume

    (tmp_path / "run.json").write_text(json.dumps({"status": "running", "command": "grpo"}))
    exits = []
    monkeypatch.setattr(resume.os, "_exit", lambda code: exits.append(code))
    stop = resume.GracefulStop(tmp_path)
    stop.step = 6
    stop._handle(signal.SIGTERM, None)  # the first: stop after this step
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "running" and not exits
    stop._handle(signal.SIGTERM, None)  # the second: at once
    info = json.loads((tmp_path / "run.json").read_text())
    assert exits == [128 + signal.SIGTERM] and info["status"] == "interrupted" and info["command"] == "grpo"
    assert info["error"].startswith("SIGTERM twice: stopped at once during step 7")


def test_a_resume_on_another_number_of_processes_says_the_global_batch_changed(finished_run: Path, cli,
                                                                               tmp_path: Path) -> None:
    """A checkpoint records how many processes saved it; resumed on another number (a node lost, or added), the run
    goes on (training.parallel's sharded optimizer state is re-split by torch.distributed.checkpoint: tried by hand,
    2 processes to 4) and says in one line that its global batch is no longer the one it started with."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "adapter")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    (run / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "output_dir": str(run)}, sort_keys=False))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "output_dir": str(run)}))
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    marker = run / "checkpoints/checkpoint-2" / MARKER
    assert json.loads(marker.read_text())["processes"] == 1  # as this one process saved it
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "processes": 2}))
    result = cli("sft", "--recipe", tmp_path / "recipe.yaml", "--resume")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "warning: checkpoint-2 was saved by 2 processes and this run has 1: the global batch is now" in said
    assert (run / "adapter/adapter_model.safetensors").is_file()
