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

    from dsft.adapters.lora import load_lora
    from dsft.evaluate import open_run
    from dsft.models.load import load_model, load_tokenizer
    from dsft.runs.run_dir import run_of

    _check_options(prompt, max_new_tokens, temperature, top_p, system)
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
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    conversation = _Conversation(model, tokenizer, recipe.data.max_length, ["adapter", "base"] if base else ["adapter"],
                                 {"max_new_tokens": max_new_tokens, **sampling}, interactive)
    conversation.start(system)
    for question in (prompt if prompt else _ask(piped)):
        if prompt or piped:  # a transcript: the question, then its answer
            typer.echo(f"you> {question}")
        if question.startswith("/"):
            if not conversation.command(question):
                return
        else:
            conversation.answer(question)


class _Conversation:
    """One history per speaker (the adapter, and the base with --base), answered in turn, streaming."""

    def __init__(self, model, tokenizer, max_length: int, speakers: list[str], generation: dict, interactive: bool):
        from transformers import TextStreamer

        self.model, self.tokenizer, self.max_length, self.generation = model, tokenizer, max_length, generation
        self.speakers, self.interactive, self.system = speakers, interactive, None
        self.histories: dict[str, list[dict]] = {name: [] for name in speakers}
        self.streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def start(self, system: str | None) -> None:
        self.system = system
        for history in self.histories.values():
            history[:] = [{"role": "system", "content": system}] if system else []

    def command(self, line: str) -> bool:
        """Run a /command; False on /quit."""
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return False
        if command == "/help":
            typer.echo(HELP)
        elif command == "/reset":
            self.start(self.system)
            typer.echo("(conversation reset)")
        elif command == "/system" and rest.strip():
            self.start(rest.strip())
            typer.echo("(system message set; conversation reset)")
        else:
            typer.echo(f"({command}: not a command; /help lists them)")
        return True

    def answer(self, question: str) -> None:
        """Each speaker answers in turn; Ctrl-C at a terminal stops the answer and drops the question."""
        for name in self.speakers:
            history = self.histories[name]
            history.append({"role": "user", "content": question})
            ids = self._context(history)
            if len(self.speakers) > 1:
                typer.echo(f"{name}> ", nl=False)
            try:
                out = self._generate(ids, base=name == "base")
            except KeyboardInterrupt:
                if not self.interactive:  # a transcript (a pipe, --prompt): Ctrl-C stops the command
                    raise
                self.streamer.end()  # what was streamed so far, and its newline
                typer.echo("(answer stopped; the question is dropped from the conversation: ask again, /quit or "
                           "Ctrl-D to end)")
                for h in self.histories.values():
                    if h and h[-1] == {"role": "user", "content": question}:
                        h.pop()
                return
            # the streamer ends each answer with a newline
            history.append({"role": "assistant",
                            "content": self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})

    def _context(self, history: list[dict]):
        import torch

        text = self.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) > self.max_length:  # the context the run trained on; older turns go first
            typer.echo(f"(the conversation is {len(tokens)} tokens; the model sees its last {self.max_length}, "
                       "the run's data.max_length)", err=True)
            tokens = tokens[-self.max_length:]
        return torch.tensor([tokens], device=next(self.model.parameters()).device)

    def _generate(self, ids, base: bool):
        import contextlib

        import torch

        from dsft.moe.fused import autocast_for

        off = self.model.disable_adapter() if base else contextlib.nullcontext()
        with torch.no_grad(), autocast_for(self.model), off:
            return self.model.generate(input_ids=ids, streamer=self.streamer, pad_token_id=self.tokenizer.pad_token_id,
                                       eos_token_id=self.tokenizer.eos_token_id, **self.generation)


def _check_options(prompt: list[str] | None, max_new_tokens: int, temperature: float, top_p: float,
                   system: str | None) -> None:
    from dsft.errors import DsftError

    at_least("--max-new-tokens", max_new_tokens, 1)
    if not 0 <= temperature < float("inf"):
        raise DsftError(f"--temperature: must be >= 0 (got {temperature}); 0 answers greedily")
    if not 0 < top_p <= 1:
        raise DsftError(f"--top-p: must be in (0, 1] (got {top_p})")
    for option, values in (("--prompt", prompt or []), ("--system", [system] if system else [])):
        for value in values:
            _text(value, option)


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
