"""The prepared-data cache on disk: what an entry holds, how it is checked, and its administration.

An entry is a directory `DSFT_CACHE/data/KEY20/` holding exactly two regular files dsft wrote:

- `data.arrow`, the tokens (Arrow IPC), whose xxh3-128 checksum is recorded when it is written;
- `meta.json`, canonical JSON (sorted keys) carrying a seal: the xxh3-128 of its own text with the seal's
  value blanked. Any changed byte of either file is found: a changed meta.json no longer matches its seal,
  a changed data.arrow no longer matches its checksum.

Every open for a run checks both (`problem(..., full=True)`): reading the tokens once at xxh3's speed (the
cost is in docs/data.md), before they are trusted. Files that datasets derives from an entry for one run
(packed rows, a trainer's reference log-probs) are never written beside it: a run maps its entries through a
view of its own (`view`: a private directory linking to `data.arrow`), which the process removes when it
ends, so nothing that was not checked is ever read back.

Ownership is decided by what a file is, not only by its name: an entry is dsft's when every item in it is a
regular file of an entry's names (a directory or link of the same name is not); only those files are ever
deleted, one by one, and a directory left with anything else is kept.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsft.outputs import cache_error, cache_root, write_atomic

FORMAT = "dsft-tokens"
DATA, META = "data.arrow", "meta.json"
ENTRY_FILES = {DATA, META}
SEAL, CHECKSUM = "seal", "data_xxh3_128"
_BLANK = "0" * 32
KEY = re.compile(r"^[0-9a-f]{20}$")
VIEWS = "views"  # DSFT_CACHE/views/PID-N/: each process's view of the entries it maps


# ---------------------------------------------------------------- checksums and the seal

def checksum(path: Path) -> str:
    """xxh3-128 of a file's bytes (read in 8 MiB blocks)."""
    import xxhash

    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _text_digest(text: str) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def sealed_text(meta: dict[str, Any]) -> str:
    """meta.json's text: canonical JSON with its seal."""
    body = {k: v for k, v in meta.items() if k != SEAL}
    text = json.dumps({**body, SEAL: _BLANK}, indent=1, sort_keys=True) + "\n"
    return text.replace(f'"{SEAL}": "{_BLANK}"', f'"{SEAL}": "{_text_digest(text)}"', 1)


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """An entry's meta.json, sealed, written beside and renamed into place."""
    write_atomic(path / META, sealed_text(meta), unique=True)


def read_meta(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(an entry's metadata, None) when its meta.json is dsft's and unchanged; else (what could be read, the
    problem)."""
    file = path / META
    try:
        if not stat.S_ISREG(os.lstat(file).st_mode):
            return None, f"{META} is not a regular file"
        raw = file.read_text(encoding="utf-8")
        meta = json.loads(raw)
    except OSError:
        return None, f"{META} missing or unreadable"
    except ValueError:
        return None, f"{META} is not JSON"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None, f"{META} is not dsft's"
    seal = meta.get(SEAL)
    if not isinstance(seal, str):
        return meta, f"{META} has no seal (written by an older dsft); remove the entry"
    if _text_digest(raw.replace(f'"{SEAL}": "{seal}"', f'"{SEAL}": "{_BLANK}"', 1)) != seal:
        return meta, f"{META} was changed after dsft wrote it (its seal differs)"
    return meta, None


def problem(path: Path, full: bool = True) -> str | None:
    """What is wrong with an entry directory, or None: dsft's files only, metadata unchanged, tokens of the
    size (and with `full`, the checksum) they were written with."""
    if path.is_symlink():
        return "a symbolic link, which dsft never makes"
    meta, wrong = read_meta(path)
    if wrong:
        return wrong
    foreign = not_ours(path)
    if foreign:
        return f"holds {foreign[0]}, which dsft did not write there"
    try:
        info = os.lstat(path / DATA)
    except OSError:
        return f"{DATA} missing"
    if not stat.S_ISREG(info.st_mode):
        return f"{DATA} is not a regular file"
    if info.st_size != meta.get("bytes"):
        return f"{DATA} is {info.st_size} bytes, {meta.get('bytes')} when written (truncated or overwritten)"
    if full and checksum(path / DATA) != meta.get(CHECKSUM):
        return f"{DATA} changed after dsft wrote it (its xxh3-128 checksum differs)"
    return None


# ---------------------------------------------------------------- ownership

def _ours(item: Path) -> bool:
    """An item dsft writes in an entry: a regular file of an entry's names (or a meta.json being replaced)."""
    try:
        regular = stat.S_ISREG(os.lstat(item).st_mode)
    except OSError:
        return False
    name = item.name
    return regular and (name in ENTRY_FILES or name.startswith(f".{META}.tmp")
                        or (name.startswith("cache-") and name.endswith(".arrow")))  # derived files of dsft < 0.2


def not_ours(path: Path) -> list[str]:
    """The items in an entry directory dsft did not write (a directory or link named like its files included)."""
    try:
        return sorted(p.name for p in path.iterdir() if not _ours(p))
    except OSError:
        return []


def delete_entry(path: Path) -> bool:
    """Delete an entry's own files one by one, then its directory if that leaves it empty; never a directory
    tree, never through a link. False (nothing deleted) when it holds anything dsft did not write."""
    if path.is_symlink() or not path.is_dir() or not_ours(path):
        return False
    for item in path.iterdir():
        item.unlink()
    path.rmdir()
    return True


def discard(path: Path) -> None:
    """A damaged entry out of the way of its key: deleted when only dsft's files are in it, else (a link, a
    user's file) renamed aside untouched."""
    if not delete_entry(path):
        path.rename(path.with_name(f"{path.name}.damaged-{os.getpid()}"))


# ---------------------------------------------------------------- the cache directory

def data_root() -> Path:
    """DSFT_CACHE/data, created; one line naming DSFT_CACHE when it cannot be."""
    root = cache_root() / "data"
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise cache_error(f"{existing} is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cache_error(f"cannot write {e.filename or root} ({e.strerror or e})") from None
    return root


def entries(root: Path | None = None) -> list[Path]:
    """Every entry in the cache: a name of 20 hex digits (a link of such a name is listed too, to be reported)."""
    root = root or (cache_root() / "data")
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if KEY.match(p.name) and (p.is_dir() or p.is_symlink()))


_VIEW: dict[Path, Path] = {}  # DSFT_CACHE/views -> this process's directory there


def _own_views() -> Path:
    """This process's view directory under the current cache (made again if it went, or the cache moved)."""
    base = cache_root() / VIEWS
    mine = _VIEW.get(base)
    if mine is not None and mine.is_dir():
        return mine
    with contextlib.suppress(OSError):
        for old in base.iterdir():
            pid = old.name.split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    try:
        base.mkdir(parents=True, exist_ok=True)
        mine = base / f"{os.getpid()}-{time.time_ns()}"
        mine.mkdir()
    except OSError:
        import tempfile

        mine = Path(tempfile.mkdtemp(prefix="dsft-view-"))
    _VIEW[base] = mine
    atexit.register(shutil.rmtree, mine, True)
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def view(entry: Path) -> Path:
    """`entry/data.arrow` as this process maps it: a link in a directory of this process's own, where datasets
    then writes what it derives (packed rows, reference log-probs) for this run only. The directory goes when
    the process ends (and a dead process's, at the next start)."""
    directory = _own_views() / entry.name
    directory.mkdir(exist_ok=True)
    link, target = directory / DATA, (entry / DATA).resolve()
    if link.is_symlink() and Path(os.readlink(link)) != target:
        link.unlink()  # an entry of the same name elsewhere (DSFT_CACHE changed within this process)
    if not link.is_symlink():
        link.symlink_to(target)
    return link


# ---------------------------------------------------------------- administration (dsft cache)

def _as(value: Any, kind: type, default: Any) -> Any:
    return value if isinstance(value, kind) and not isinstance(value, bool) else default


@dataclass
class Entry:
    """An entry as `dsft cache` shows it: its metadata read defensively (any shape), and its problem."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        return _as(self.meta.get("kind"), str, "?")

    @property
    def rows(self) -> int:
        return _as(self.meta.get("rows"), int, 0)

    @property
    def tokens(self) -> int:
        return _as(self.meta.get("tokens"), int, 0)

    @property
    def files(self) -> list[dict[str, Any]]:
        """The source files recorded ({path, sha256, stat}); records of another shape are left out."""
        return [f for f in _as(self.meta.get("files"), list, []) if isinstance(f, dict) and isinstance(f.get("path"), str)]

    @property
    def size(self) -> int:
        if self.path.is_symlink():
            return 0
        with contextlib.suppress(OSError):
            return sum(p.lstat().st_size for p in self.path.iterdir() if p.is_file() and not p.is_symlink())
        return 0

    @property
    def age(self) -> float:
        created = _as(self.meta.get("created"), (int, float), None)
        if created is None:
            with contextlib.suppress(OSError):
                created = self.path.lstat().st_mtime
        return time.time() - float(created or time.time())


def listing() -> list[Entry]:
    """Every entry with its metadata (as read, whatever its shape) and its problem (sizes only: cheap)."""
    out = []
    for path in entries():
        meta, _ = read_meta(path) if not path.is_symlink() else (None, None)
        out.append(Entry(path, meta if isinstance(meta, dict) else {}, problem(path, full=False)))
    return out


def remove(entry: Entry) -> bool:
    """Delete an entry of dsft's (its own files only); False when it is a link or holds anything else."""
    return delete_entry(entry.path)
