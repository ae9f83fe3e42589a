"""`dsft chat`: talk to base + adapter before merging."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import at_least, errors_exit_2


HELP = ("/help       these commands\n"
        "/reset      forget the conversation (the system message stays)\n"
        "/system T   set the system message to T and start over\n"
        "/quit       end (so do an empty line and Ctrl-D)\n"
        "Ctrl-C      stop the answer being written (at the prompt: clear the line)")


@errors_exit_2
def chat(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="A finished dsft run directory (or its adapter/).", show_default=False)],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A question (repeatable: a conversation); "
                                                     "without it, questions are read from the terminal or a pipe.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 answers greedily (the same answer "
                                               "every time).")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: the smallest set of tokens whose probability "
                                         "reaches top-p (with --temperature above 0).")] = 1.0,
    base: Annotated[bool, typer.Option("--base", help="Also answer with the base model (the adapter switched off), "
                                       "beside the adapter's answer.")] = False,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Chat with a failed or interrupted run's adapter, or on a base whose weights are not the ones it was "
                                        "trained on.")] = False,
) -> None:
    """Answer with the run's adapter, streaming tokens, in the run's chat template. Commands: /help, /reset,
    /system TEXT, /quit (an empty line or Ctrl-D ends too)."""
    import contextlib

    import torch
    from transformers import TextStreamer

    from dsft.adapters.lora import load_lora
    from dsft.errors import DsftError
    from dsft.models.load import load_model, load_tokenizer
    from dsft.moe.fused import autocast_for
    from dsft.evaluate import open_run
    from dsft.runs.run_dir import run_of

    at_least("--max-new-tokens", max_new_tokens, 1)
    if not 0 <= temperature < float("inf"):
        raise DsftError(f"--temperature: must be >= 0 (got {temperature}); 0 answers greedily")
    if not 0 < top_p <= 1:
        raise DsftError(f"--top-p: must be in (0, 1] (got {top_p})")
    for option, values in (("--prompt", prompt or []), ("--system", [system] if system else [])):
        for value in values:
            _text(value, option)
    run = run_of(adapter)
    recipe, adapter_dir, model_path = open_run(run, force, "chat with")
    tokenizer = load_tokenizer(adapter_dir)
    model = load_lora(load_model(recipe.model, model_path), str(adapter_dir))
    model.eval()
    piped = not prompt and not _terminal_stdin()  # with --prompt, stdin is never read (it may be closed)
    interactive = not prompt and not piped
    if interactive:  # a transcript (a pipe, --prompt) is questions and answers only: no banner
        with contextlib.suppress(ImportError):  # line editing and history for input() (not on every platform)
            import readline  # noqa: F401
        typer.echo(f"dsft chat: {run} (base {recipe.model.path}; "
                   f"{'greedy' if temperature == 0 else f'temperature {temperature:g}, top-p {top_p:g}'}, up to "
                   f"{max_new_tokens} new tokens{'; the base answers too' if base else ''})\n"
                   "commands: /help /reset /system TEXT /quit; an empty line or Ctrl-D ends")
    speakers = ["adapter", "base"] if base else ["adapter"]
    histories = {name: [] for name in speakers}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}

    def start(system_text: str | None) -> None:
        for history in histories.values():
            history[:] = [{"role": "system", "content": system_text}] if system_text else []

    start(system)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for question in (prompt if prompt else _ask(piped)):
        if prompt or piped:  # a transcript: the question, then its answer
            typer.echo(f"you> {question}")
        if question.startswith("/"):
            command, _, rest = question.partition(" ")
            if command == "/quit":
                return
            if command == "/help":
                typer.echo(HELP)
            elif command == "/reset":
                start(system)
                typer.echo("(conversation reset)")
            elif command == "/system" and rest.strip():
                system = rest.strip()
                start(system)
                typer.echo("(system message set; conversation reset)")
            else:
                typer.echo(f"({command}: not a command; /help lists them)")
            continue
        for name in speakers:
            history = histories[name]
            history.append({"role": "user", "content": question})
            text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(tokens) > recipe.data.max_length:  # the context the run trained on; older turns go first
                typer.echo(f"(the conversation is {len(tokens)} tokens; the model sees its last {recipe.data.max_length}, "
                           "the run's data.max_length)", err=True)
                tokens = tokens[-recipe.data.max_length:]
            ids = torch.tensor([tokens], device=next(model.parameters()).device)
            if base:
                typer.echo(f"{name}> ", nl=False)
            off = model.disable_adapter() if name == "base" else contextlib.nullcontext()
            try:
                with torch.no_grad(), autocast_for(model), off:
                    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, streamer=streamer,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                         **sampling)
            except KeyboardInterrupt:
                if not interactive:  # a transcript (a pipe, --prompt): Ctrl-C stops the command
                    raise
                streamer.end()  # what was streamed so far, and its newline
                typer.echo("(answer stopped; the question is dropped from the conversation: ask again, /quit or "
                           "Ctrl-D to end)")
                for h in histories.values():
                    if h and h[-1] == {"role": "user", "content": question}:
                        h.pop()
                break
            # the streamer ends each answer with a newline
            history.append({"role": "assistant", "content": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})


def _text(value: str, where: str) -> str:
    """A question as text: UTF-8 without NUL bytes or lone surrogates (what a binary file or a mis-decoded
    argument holds), else one line naming where it came from."""
    from dsft.errors import DsftError

    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DsftError(f"{where}: not UTF-8 text; give questions as text") from None
    if "\x00" in value:
        raise DsftError(f"{where}: holds NUL bytes, so it is binary data, not a question; give questions as text")
    return value


def _ask(piped: bool):
    """Questions from a pipe (every non-empty line, to EOF) or the terminal (until an empty line or Ctrl-D)."""
    from dsft.errors import DsftError

    if piped:
        if sys.stdin is None or sys.stdin.closed:
            raise DsftError("stdin: closed, so there are no questions to read; give them with --prompt, or pipe them in")
        stream = getattr(sys.stdin, "buffer", sys.stdin)
        for n, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError:
                raise DsftError(f"stdin: line {n} is not UTF-8 text; pipe questions as text, one per line") from None
            if line.strip():
                yield _text(line.strip(), f"stdin: line {n}")
        return
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            typer.echo("")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as a shell does
            typer.echo("")
            continue
        except UnicodeDecodeError:
            raise DsftError("stdin: not UTF-8 text; type questions as text") from None
        if not line:
            return
        yield _text(line, "stdin")


def _terminal_stdin() -> bool:
    """stdin is a terminal (False when it is closed or absent, as under `nohup ... <&-` or some schedulers)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False
