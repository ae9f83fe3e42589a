"""First contact: a recipe given positionally, a run given as its adapter/, files that follow the umask, a
console with no line dsft did not write (the kernels hub line, library warnings) in a real process, and a second
`dsft sft` into a run that process holds refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# lines libraries print on their own when nothing stops them (seen on this stack)
FOREIGN = ("Skipping publisher trust check", "Failed to load CPU gemm_4bit_forward", "Warning:", "warnings.warn",
           "FutureWarning", "UserWarning", "DeprecationWarning", "it/s]", "Traceback", "WARNING")


def test_recipe_positionally_and_run_as_its_adapter_dir(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(training={"max_steps": 1}, adapter={"routed_experts": {1: [0, 3], 2: [5]}})
    result = cli("sft", recipe)  # as `dsft validate RECIPE` takes it
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    result = cli("eval", "--adapter", run / "adapter", "--on-train", "--generations", 0, "--samples", 4)
    assert result.exit_code == 0, result.output
    assert (run / "eval.json").is_file() and not (run / "adapter" / "eval.json").exists()
    result = cli("chat", "--adapter", run / "adapter")
    assert result.exit_code == 0, result.output
    result = cli("experts", "plan", recipe)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "3 experts (of 8 per layer, 2 MoE layers)" in flat and "L1: 2 [0, 3]" in flat  # counts per layer
    missing = cli("sft")
    assert missing.exit_code == 2 and "--recipe: give the recipe file" in missing.output


def test_files_follow_the_umask(make_recipe, cli, tmp_path: Path) -> None:
    mask = os.umask(0o027)
    try:
        result = cli("sft", "--recipe", make_recipe(training={"max_steps": 1}))
        assert result.exit_code == 0, result.output
        run = tmp_path / "run"
        result = cli("export", "--adapter", run, "--format", "peft", "--out", tmp_path / "peft")
        assert result.exit_code == 0, result.output
    finally:
        os.umask(mask)
    for path in [run / "adapter", tmp_path / "peft"]:
        assert path.stat().st_mode & 0o777 == 0o750, path
        for f in path.iterdir():
            assert f.stat().st_mode & 0o777 == 0o640, f  # safetensors alone would write 0600


def test_no_line_on_the_console_is_not_dsfts_and_a_second_sft_into_the_run_is_refused(
        tmp_path: Path, cli, capfd: pytest.CaptureFixture) -> None:
    """`dsft sft` as a user runs it, in a fresh process (every import's lines included), then `dsft export` of its
    run (here, warnings shown each time): every library line off the console. While that process holds the run,
    the same command started here is refused, naming it, and writes nothing (before: both exited 0 and the run mixed
    them, one's recipe.yaml and the other's run.json argv); the first ends complete with its own recipe, argv and
    metrics, and its last printed and logged lines arrive (`dsft` skips the interpreter's teardown at exit:
    dsft.cli.app._exit)."""
    import json
    import time
    import warnings

    import yaml

    from conftest import legal_rows, write_jsonl
    from dsft.locks import LOCK_NAME

    train = write_jsonl(tmp_path / "train.jsonl", legal_rows(8))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": "builtin:tiny-deepseek-v3", "dtype": "float32",
                                                "quantization": "nf4"},
                                      "data": {"train": str(train), "max_length": 128},
                                      "adapter": {"r": 4, "alpha": 8, "routed_experts": {1: [0]}},
                                      "training": {"max_steps": 4, "micro_batch_size": 4, "logging_steps": 1},
                                      "output_dir": str(tmp_path / "run")}))
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    proc = subprocess.Popen([sys.executable, "-m", "dsft", "sft", str(recipe), "--set", "training.seed=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lock, deadline = tmp_path / "run" / LOCK_NAME, time.time() + 120
    while not (lock.is_file() and lock.read_text().strip() == str(proc.pid)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    second = cli("sft", recipe, "--set", "training.seed=2")
    assert second.exit_code == 2 and f"is in use by a running dsft process (pid {proc.pid}" in second.output, second.output
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    run = tmp_path / "run"
    info, saved = json.loads((run / "run.json").read_text()), yaml.safe_load((run / "recipe.yaml").read_text())
    assert info["status"] == "complete" and "training.seed=1" in info["argv"] and saved["training"]["seed"] == 1
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one run's rows, not two interleaved
    assert (run / "run.log").read_text().splitlines()[-1].endswith(str(run / "run.log"))
    assert out.rstrip().endswith(str(run / "run.log"))
    printed = [out + err]
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        exported = cli("export", "--adapter", run, "--format", "vllm", "--out", tmp_path / "vllm")
    assert exported.exit_code == 0, exported.output
    printed += [exported.output, *capfd.readouterr()]
    foreign = [line for text in printed for line in text.splitlines() if any(mark in line for mark in FOREIGN)]
    assert not foreign, foreign


def _pty_session(argv: list[str], keys: list[bytes], timeout: float = 120.0) -> str:
    """Run `python -m dsft ARGV` on a pseudo-terminal, type `keys` one line at a time as each prompt
    appears, and return everything it printed."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: dsft on the terminal
        os.chdir(REPO)
        os.execvpe(sys.executable, [sys.executable, "-m", "dsft", *argv], {**os.environ, "TERM": "dumb"})
    out, pending, deadline = b"", list(keys), time.time() + timeout
    prompts = 0
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if pending and out.count(b"you> ") > prompts:
            prompts = out.count(b"you> ")
            os.write(fd, pending.pop(0))
    os.waitpid(pid, 0)
    return out.decode("utf-8", "replace").replace("\r\n", "\n")


def test_chat_on_a_terminal(make_recipe, cli, tmp_path: Path) -> None:
    """Banner, /help and /reset handled by dsft (never sent to the model), the Up arrow recalls the last
    question (readline), --base answers beside the adapter, /quit ends."""
    result = cli("sft", "--recipe", make_recipe(training={"max_steps": 1}))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    text = _pty_session(["chat", "--adapter", str(run), "--base", "--max-new-tokens", "3", "--temperature", "0.7",
                         "--top-p", "0.9"],
                        [b"/help\n", b"What is a lease?\n", b"\x1b[A\n", b"/reset\n", b"/quit\n"])
    assert f"dsft chat: {run}" in text and "commands: /help /reset /system TEXT /quit" in text
    assert "temperature 0.7, top-p 0.9" in text and "the base answers too" in text
    assert "/reset      forget the conversation" in text and "(conversation reset)" in text
    assert "^[[A" not in text
    # the question, then the Up arrow's recall of it: both answered by the adapter and the base
    assert text.count("adapter> ") == 2 and text.count("base> ") == 2, text
    assert text.count("What is a lease?") >= 2


def test_a_phase_on_a_terminal_ends_with_its_elapsed_time(monkeypatch) -> None:
    """The bar goes when the phase ends (no finished bar at 0:00:00, no stuck `0/?`); the last line says what
    was done and how long it took."""
    import io

    from rich.console import Console

    from dsft import console as dsft_console

    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=100, soft_wrap=True)
    monkeypatch.setattr(dsft_console, "console", lambda *a, **k: terminal)
    with dsft_console.Phase("tokenizing data.train", 3, "rows") as phase:
        phase.advance(3)
    with dsft_console.Phase("preparing the trainer", None):
        pass
    lines = [line for line in buffer.getvalue().replace("\r", "\n").split("\n") if line.strip()]
    plain = [line for line in lines if "tokenizing data.train: 3/3 rows  (0:00)" in line]
    assert plain and any("preparing the trainer  (0:00)" in line for line in lines)


def test_a_command_that_fails_at_once_imports_nothing_heavy() -> None:
    """`dsft export --format tgi` and a recipe that is not there fail before torch or peft is imported."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom dsft.cli.app import app\n"
            "r = CliRunner().invoke(app, ['export', '--adapter', 'x', '--format', 'tgi', '--out', 'y'])\n"
            "assert r.exit_code == 2, r.output\n"
            "r = CliRunner().invoke(app, ['sft', 'no-such-recipe.yaml'])\n"
            "assert r.exit_code == 2, r.output\n"
            "heavy = [m for m in ('torch', 'peft', 'transformers', 'trl') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
