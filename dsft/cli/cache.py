"""`dsft cache list|verify|remove`: the prepared-data cache (tokenized data files) under DSFT_CACHE/data."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from dsft.cli._common import errors_exit_2
from dsft.errors import DsftError

app = typer.Typer(help="The prepared-data cache: list, verify and remove tokenized data.", no_args_is_help=True)

KeysArg = Annotated[list[str] | None, typer.Argument(metavar="[KEY]...", help="Entries by key (a prefix is enough).",
                                                     show_default=False)]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def parse_age(text: str) -> float:
    """`30d`, `12h`, `2w`, `90m` as seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise DsftError(f"--older-than {text!r}: give an age like 30d, 12h, 2w or 90m")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _chosen(keys: list[str] | None):  # noqa: ANN202 - dsft.data.store.Entry, imported lazily
    """The entries named by `keys` (each the start of exactly one entry's key), or all of them; an empty, non-hex,
    unknown or ambiguous key is refused before anything is done."""
    from dsft.data.store import listing

    found = listing()
    if not keys:
        return found
    picked = []
    for key in keys:
        prefix = key.strip().lower()
        if not prefix:
            raise DsftError("KEY '': empty (an unset shell variable?); give the start of an entry's key, as `dsft cache "
                            "list` shows it, or --all")
        if not re.fullmatch(r"[0-9a-f]{1,20}", prefix):
            raise DsftError(f"{key}: not a cache key (keys are 20 hexadecimal digits); `dsft cache list` shows them")
        matches = [e for e in found if e.path.name.startswith(prefix)]
        if not matches:
            raise DsftError(f"{key}: no cache entry has this key; `dsft cache list` shows them")
        if len(matches) > 1:
            raise DsftError(f"{key}: the start of {len(matches)} entries' keys ({', '.join(m.key for m in matches[:3])}"
                            f"{', ...' if len(matches) > 3 else ''}); give more of the key")
        picked += [m for m in matches if m not in picked]
    return picked


@app.command("list")
@errors_exit_2
def list_() -> None:
    """Every entry: key, what it holds (kind, rows, tokens, its files), size and age."""
    from rich.table import Table

    from dsft.console import show, say
    from dsft.outputs import cache_root, human_size

    found = _chosen(None)
    table = Table(title=f"dsft prepared-data cache: {cache_root() / 'data'}")
    for column in ("key", "kind", "rows", "tokens", "size", "age", "files"):
        table.add_column(column, justify="right" if column in ("rows", "tokens", "size", "age") else "left")
    for entry in found:
        files = ", ".join(f["path"] for f in entry.files) or "?"
        table.add_row(entry.key, entry.kind + (f" (damaged: {entry.problem})" if entry.problem else ""),
                      f"{entry.rows:,}", f"{entry.tokens:,}", human_size(entry.size), _age(entry.age), files)
    show(table)
    say(f"{len(found)} entries, {human_size(sum(e.size for e in found))}")


@app.command("verify")
@errors_exit_2
def verify(keys: KeysArg = None) -> None:
    """Check entries: every byte as dsft wrote it (the tokens' checksum, the metadata's seal), and the data files
    they were built from unchanged (sha256). Exit 1 when any entry has a problem."""
    from dsft.console import say
    from dsft.data.prepared import verify as check

    bad = 0
    for entry in _chosen(keys):
        try:
            problems = check(entry)
        except OSError as e:
            problems = [f"cannot be read ({e.strerror or e})"]
        bad += bool(problems)
        say(f"{entry.key}: " + ("ok" if not problems else "; ".join(problems)))
    if bad:
        raise typer.Exit(1)


@app.command("remove")
@errors_exit_2
def remove(
    keys: KeysArg = None,
    older_than: Annotated[str | None, typer.Option("--older-than", help="Remove entries older than this (30d, 12h, 2w).",
                                                   show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
) -> None:
    """Remove entries (dsft rebuilds one when a run needs it): by key, by age, or all."""
    from dsft.console import say
    from dsft.data.store import remove as drop
    from dsft.outputs import human_size

    if not (keys or older_than or all_):
        raise DsftError("dsft cache remove: name the entries (KEY...), or pass --older-than AGE or --all")
    if all_ and (keys or older_than):
        raise DsftError("dsft cache remove: --all removes every entry; give it alone, or name the entries / --older-than")
    limit = parse_age(older_than) if older_than else None
    freed = removed = kept = 0
    for entry in _chosen(keys):
        if limit is not None and entry.age <= limit:
            continue
        size = entry.size
        try:
            gone = drop(entry)
        except OSError as e:  # one entry that cannot be removed never stops the others
            say(f"{entry.path}: not removed ({e.strerror or e})", stderr=True)
            kept += 1
            continue
        if gone:
            removed, freed = removed + 1, freed + size
        else:
            why = "a symbolic link, which dsft never makes" if entry.path.is_symlink() else "it holds files dsft did not write there"
            say(f"{entry.path}: kept; {why}", stderr=True)
            kept += 1
    say(f"removed {removed} entries ({human_size(freed)})" + (f"; {kept} kept (above)" if kept else ""))
    if kept:
        raise typer.Exit(1)
