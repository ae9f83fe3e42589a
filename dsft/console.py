"""dsft owns the console. Long phases show one progress display each: a rich bar on a terminal, plain
lines without one (no `\\r`). Tables that do not fit the width are printed as records, every value whole
(a path to copy is never cut). The libraries' bars are off (dsft.cli._common.offline) and, during a run,
their logs and warnings go to the run's `run.log` with every line dsft shows, not to the console."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

LOG = logging.getLogger("dsft")
LOG.addHandler(logging.NullHandler())
LOG.propagate = False
LOG.setLevel(logging.INFO)
# Whose log records a run's run.log takes (and keeps off the console while the run lasts).
LIBRARIES = ("transformers", "trl", "peft", "datasets", "accelerate", "huggingface_hub", "bitsandbytes", "torch",
             "math_verify", "latex2sympy2_extended", "py.warnings")
PLAIN_EVERY_S = 30.0  # without a terminal: a progress line at most this often (and one at the end)


def console(stderr: bool = False, quiet: bool = False) -> Any:
    """dsft's rich Console: text lines are never wrapped by rich (a path stays whole; the terminal wraps)."""
    from rich.console import Console

    return Console(stderr=stderr, quiet=quiet, soft_wrap=True)


def _plain(renderable: Any) -> str:
    """`renderable` as plain text, wide enough that nothing folds (for run.log)."""
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=240, color_system=None, force_terminal=False, soft_wrap=True).print(renderable)
    return buffer.getvalue().rstrip("\n")


def say(text: Any, stderr: bool = False, highlight: bool | None = None) -> None:
    """Print a line (rich markup allowed) and log it to the run's log."""
    console(stderr).print(text, soft_wrap=True, highlight=highlight)
    LOG.info(_plain(text))


def show(table: Any) -> None:
    """Print a rich Table. On a terminal, one wider than the console becomes records (title, then `column:
    value` lines, a value too long for its line on a line of its own), so no value is cut or wrapped mid-way.
    Without a terminal (nohup, SLURM, a pipe, tee) the table is printed whole as run.log holds it, at a fixed
    width that does not depend on the environment: the same text for every run, for a file to keep and a
    script to read. Logged to the run's log either way."""
    from rich.measure import Measurement
    from rich.text import Text

    out = console()
    plain = _plain(table)
    LOG.info(plain)
    if not out.is_terminal:
        out.print(Text(plain), soft_wrap=True)
        return
    # measured unconstrained: rich clamps a measurement to the width it is given
    width = Measurement.get(out, out.options.update(max_width=1 << 16), table).maximum
    if width <= out.width:
        if table.title and Text.from_markup(str(table.title)).cell_len > width:  # rich would wrap the title
            out.print(Text.from_markup(str(table.title), style="italic"), soft_wrap=True)
            table.title = None
        out.print(table)
        return
    cell = lambda value: value if isinstance(value, Text) else Text.from_markup(str(value))  # noqa: E731
    if table.title:
        out.print(cell(table.title), style="bold", soft_wrap=True)
    headers = [cell(c.header).plain for c in table.columns]
    rows = list(zip(*(list(c.cells) for c in table.columns)))
    named = len(table.columns) == 2  # a key/value table: the key names the value
    indent = "" if named else "  "
    for row in rows:
        first, rest = cell(row[0]), [cell(v) for v in row[1:]]
        items = [(first, rest[0])] if named else [(Text(f"{headers[0]} ") + first, None)] + list(
            zip((Text(h) for h in headers[1:]), rest))
        for key, value in items:
            if value is not None and not value.plain.strip():
                continue
            if value is None:
                out.print(key, style="bold", soft_wrap=True)
                continue
            line = Text(indent) + key + Text(": ") + value
            if line.cell_len <= out.width:
                out.print(line, soft_wrap=True)
            else:
                out.print(Text(indent) + key + Text(":"), soft_wrap=True)
                out.print(Text(indent + "    ") + value, soft_wrap=True)


class Phase:
    """One long phase's progress: `advance` / `update` it, `note` prints a line above it. On a terminal a
    rich bar (with `info`, e.g. loss and lr); otherwise a plain line at most every PLAIN_EVERY_S seconds
    or when `note` is called, and a last line when it ends."""

    def __init__(self, description: str, total: int | None, unit: str = "", completed: int = 0) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.completed, self.start_completed, self.info = completed, completed, ""
        self.out = console()
        self.progress, self.task, self.started, self.last_line = None, None, 0.0, 0.0

    def __enter__(self) -> Phase:
        self.started = self.last_line = time.monotonic()
        LOG.info(f"{self.description}: started" + (f" ({self.total} {self.unit})".rstrip() if self.total else ""))
        if self.out.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.out,
                                     transient=True)  # the bar goes when the phase ends; its last line stays
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total, completed=self.completed, info="")
        return self

    def eta(self) -> float | None:
        done = self.completed - self.start_completed
        if not self.total or done <= 0:
            return None
        return (time.monotonic() - self.started) / done * (self.total - self.completed)

    def update(self, completed: int | None = None, advance: int = 0, info: str | None = None) -> None:
        self.completed = (self.completed if completed is None else completed) + advance
        if info is not None:
            self.info = info
        if self.progress is not None:
            self.progress.update(self.task, completed=self.completed, info=self.info)
        elif time.monotonic() - self.last_line >= PLAIN_EVERY_S:
            self._line()

    def advance(self, n: int = 1) -> None:
        self.update(advance=n)

    def _status(self) -> str:
        if self.total is None and not self.completed:  # a phase with no count: its name (and, at the end, time)
            return f"{self.description}" + (f"  {self.info}" if self.info else "")
        eta = self.eta()
        total = f"/{self.total}" if self.total else ""
        left = f"  eta {_clock(eta)}" if eta is not None and self.completed < (self.total or 0) else ""
        return f"{self.description}: {self.completed}{total} {self.unit}".rstrip() + (f"  {self.info}" if self.info else "") + left

    def _line(self) -> None:
        self.last_line = time.monotonic()
        self.out.print(self._status(), soft_wrap=True, highlight=False)

    def note(self, text: str) -> None:
        """A line of its own (e.g. a logged step): printed above the bar, or as a plain line; and logged."""
        LOG.info(text)
        if self.progress is not None:
            self.progress.console.print(text, soft_wrap=True, highlight=False)
        else:
            self.last_line = time.monotonic()
            self.out.print(text, soft_wrap=True, highlight=False)

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        last = f"{self._status()}  ({_clock(time.monotonic() - self.started)})"
        if self.progress is not None:
            self.progress.stop()
        if kind is None:  # every phase ends with what it did and its elapsed time, on a terminal too
            self.out.print(last, soft_wrap=True, highlight=False)
        LOG.info(last + ("" if kind is None else f"; stopped by {kind.__name__}"))


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def track(items: Iterable[Any], description: str, total: int | None = None, unit: str = "",
          disable: bool = False) -> Iterator[Any]:
    """Iterate `items` inside a Phase (rich.progress.track's shape)."""
    if disable:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Phase(description, total, unit) as phase:
        for item in items:
            yield item
            phase.advance()


@contextlib.contextmanager
def run_log(path: Path | None) -> Iterator[None]:
    """Append everything logged during the block to `path`: dsft's lines, and the libraries' logs and
    Python warnings, which stay off the console meanwhile (their own handlers too: torch's writes to stderr). With
    None (a process other than the main one, whose run.log has the same lines) they go nowhere."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8") if path is not None else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    saved = []
    with contextlib.suppress(ImportError):
        import transformers.utils.logging as hf_logging

        hf_logging.disable_default_handler()
    names = ("dsft", *LIBRARIES) if path is not None else LIBRARIES
    own = [name for name, logger in list(logging.Logger.manager.loggerDict.items())  # torch.distributed's, ...
           if isinstance(logger, logging.Logger) and logger.handlers and name.startswith(tuple(n + "." for n in names))]
    for name in (*names, *own):
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, list(logger.handlers)))
        for own in list(logger.handlers):
            logger.removeHandler(own)
        logger.addHandler(handler)
        logger.propagate = False
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for logger, propagate, handlers in saved:
            logger.removeHandler(handler)
            for own in handlers:
                logger.addHandler(own)
            logger.propagate = propagate
        with contextlib.suppress(ImportError):
            import transformers.utils.logging as hf_logging

            hf_logging.enable_default_handler()
        handler.close()
