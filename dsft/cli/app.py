"""The `dsft` root: registers one command per module, and one training command per built-in objective
(dsft.train.BUILTIN), nothing else."""

from __future__ import annotations

import typer

from dsft.cli import cache, chat, convert, eval, experts, export, merge, validate
from dsft.cli._common import offline, training_command
from dsft.train import BUILTIN

app = typer.Typer(
    name="dsft",
    help="Fine-tune and align DeepSeek-style Mixture-of-Experts models: LoRA/QLoRA SFT, DPO, KTO, ORPO, SimPO, GRPO, merge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        from dsft import __version__

        typer.echo(f"dsft {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    offline()


app.command("validate")(validate.validate)
for _name, _objective in BUILTIN.items():
    app.command(_name)(training_command(_name, _objective.help))
app.command("merge")(merge.merge)
app.command("eval")(eval.eval_)
app.command("chat")(chat.chat)
app.command("convert")(convert.convert)
app.command("export")(export.export)
app.add_typer(experts.app, name="experts")
app.add_typer(cache.app, name="cache")


def main() -> None:
    import os

    os.environ["DSFT_HANDLE_SIGNALS"] = "1"  # dsft.train.resume: Ctrl-C / SIGTERM stop a run with a checkpoint
    try:
        app()
    except SystemExit as stop:
        _exit(stop.code)
    _exit(0)


def _exit(code: int | str | None) -> None:
    """End the command without the interpreter's teardown of every module, about 3 s of CPU once torch and
    transformers are imported (on each of N processes): what exiting does for dsft's files still happens first
    (other threads finish, the atexit handlers run: logging flushes and closes run.log, temporary directories
    and worker pools go), then the standard streams are flushed and the process ends with `code`."""
    import atexit
    import contextlib
    import os
    import sys
    import threading

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)
