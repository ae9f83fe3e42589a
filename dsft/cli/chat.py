"""`dsft chat`: talk to base + adapter before merging."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import at_least, errors_exit_2


@errors_exit_2
def chat(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="A finished dsft run directory.", show_default=False)],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A question (repeatable: a conversation); "
                                                     "without it, questions are read from the terminal or a pipe.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 256,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Chat with a failed or interrupted run's adapter, or on a base whose weights are not the ones it was "
                                        "trained on.")] = False,
) -> None:
    """Answer with the run's adapter, streaming tokens, in the run's chat template (empty line or Ctrl-D ends)."""
    import torch
    from transformers import TextStreamer

    from dsft.adapters.lora import load_lora
    from dsft.models.load import load_model, load_tokenizer
    from dsft.moe.fused import autocast_for
    from dsft.train.evaluate import open_run

    at_least("--max-new-tokens", max_new_tokens, 1)
    for option, values in (("--prompt", prompt or []), ("--system", [system] if system else [])):
        for value in values:
            _text(value, option)
    recipe, adapter_dir, model_path = open_run(adapter, force, "chat with")
    tokenizer = load_tokenizer(adapter_dir)
    model = load_lora(load_model(recipe.model, model_path), str(adapter_dir))
    model.eval()
    history = [{"role": "system", "content": system}] if system else []
    piped = not sys.stdin.isatty()
    questions = prompt if prompt else _ask(piped)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for question in questions:
        if prompt or piped:  # a transcript: the question, then its answer
            typer.echo(f"you> {question}")
        history.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) > recipe.data.max_length:  # the context the run trained on; older turns go first
            typer.echo(f"(the conversation is {len(tokens)} tokens; the model sees its last {recipe.data.max_length}, "
                       "the run's data.max_length)", err=True)
            tokens = tokens[-recipe.data.max_length:]
        ids = torch.tensor([tokens], device=next(model.parameters()).device)
        with torch.no_grad(), autocast_for(model):
            out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
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
        except UnicodeDecodeError:
            raise DsftError("stdin: not UTF-8 text; type questions as text") from None
        if not line:
            return
        yield _text(line, "stdin")
