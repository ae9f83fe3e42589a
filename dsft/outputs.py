"""What every dsft writer obeys: never touch what dsft did not make, one process per output, and
file-system errors reported as one line.

- `check_location`: before anything is created, an output path may not be a file, sit under a file,
  equal or contain any input of the command, or lie inside a model checkpoint; its nearest existing
  parent must take a new entry (probed by making and removing one, since CI runs as root and
  permission bits say nothing there).
- `OutputLock`: a POSIX advisory lock on a file inside the output, holding the owner's pid. The kernel
  drops it when the process dies, kill -9 included, so there is never a stale lock to clean up.
- `os_error`: an OSError from a writer (disk full, read-only file system, permission) as the one
  line the CLI prints.

No torch, no transformers: the lowest layer, next to dsft.errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsft.errors import DsftError

LOCK_NAME = ".dsft.lock"
WEIGHT_MARKERS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")


def human_size(n: float) -> str:
    """Bytes in the unit that fits: 512 B, 3.4 MiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_checkpoint(path: Path) -> bool:
    """A model checkpoint directory: config.json beside weights."""
    return (path / "config.json").is_file() and any((path / m).is_file() for m in WEIGHT_MARKERS)


def read_json(path: Path, what: str = "", mapping: bool = True) -> Any:
    """JSON from `path`, or one line saying the file is damaged."""
    hint = what or "the file is damaged; restore or re-create it"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DsftError(f"{path}: not UTF-8 text; {hint}") from None
    except ValueError as e:
        raise DsftError(f"{path}: not valid JSON ({e}); {hint}") from None
    if mapping and not isinstance(data, dict):
        raise DsftError(f"{path}: must be a JSON object, got {type(data).__name__}; {hint}")
    return data


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def nearest_existing(path: Path) -> Path:
    """The path itself or its nearest existing ancestor."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")


def check_writable(path: Path, key: str) -> None:
    """`path` (to be created, or an existing directory) can be written: no file in the way, and its
    nearest existing directory takes a new entry."""
    path = Path(os.path.abspath(path))
    existing = nearest_existing(path)
    if existing != path and not existing.is_dir():
        raise DsftError(f"{key}: {existing} is a file, so {path} cannot be created there; choose another path")
    probe = existing / f".dsft-write-probe-{os.getpid()}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise DsftError(f"{key}: cannot write in {existing} ({e.strerror or e}); choose a writable location") from None


def check_location(out: Path, key: str, inputs: dict[str, list[Path]] | None = None, replaceable: bool = False) -> None:
    """Refuse an output path that would overwrite or contain an input of the command, or that lies inside a
    model checkpoint (`replaceable`: `out` itself may be a checkpoint dsft wrote, e.g. a merged model)."""
    out_abs = Path(os.path.abspath(out))
    resolved = out_abs.resolve()
    if out_abs.exists() and not out_abs.is_dir():
        raise DsftError(f"{key}: {out} is a file; choose a directory path")
    for label, paths in (inputs or {}).items():
        for p in paths:
            target = Path(p).resolve()
            if resolved == target:
                raise DsftError(f"{key}: {out} is the {label}; dsft never writes over its inputs: choose another directory")
            if _within(target, resolved):
                raise DsftError(f"{key}: {out} contains the {label} {p}; dsft never writes over its inputs: "
                                "choose another directory")
    parents = resolved.parents if replaceable else (resolved, *resolved.parents)
    for parent in parents:
        if parent.is_dir() and is_checkpoint(parent):
            raise DsftError(f"{key}: {out} is inside the model checkpoint {parent}; write outside checkpoint "
                            "directories")
    check_writable(out_abs, key)


def check_replaceable(out: Path, record: str, what: str, force: bool) -> None:
    """An existing, non-empty `out` is replaced only with --force, and only when dsft wrote it (`record`,
    the file every dsft writer leaves in its output, is there)."""
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if record not in entries:
        raise DsftError(f"--out {out} holds files dsft did not write ({', '.join(entries[:3])}); --force replaces only "
                        f"{what} dsft wrote ({record}): choose another --out")
    if not force:
        raise DsftError(f"--out {out} already exists; pass --force to replace it or choose another directory")


class OutputLock:
    """An exclusive lock on DIR/.dsft.lock holding this process's pid; `key` names the output in the
    refusal (or `busy` is the refusal). Creates DIR (and its parents) if needed, and removes them again
    when the body fails before anything else was written there."""

    def __init__(self, directory: Path, key: str, name: str = LOCK_NAME, busy: str | None = None) -> None:
        self.path = Path(directory) / name
        self.key, self.busy = key, busy
        self._file: Any = None

    def __enter__(self) -> "OutputLock":
        directory = self.path.parent
        self._created = [p for p in (directory, *directory.parents) if not p.exists()]
        directory.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until __exit__
        try:
            import fcntl  # POSIX; elsewhere outputs go unlocked

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except BlockingIOError:
            f.close()
            pid = holder(self.path.parent, self.path.name)
            who = f"pid {pid}" if pid and pid > 0 else "another process"
            raise DsftError(self.busy or f"{self.key}: {self.path.parent} is in use by a running dsft process ({who}); "
                            "wait for it to finish, stop it, or choose another path") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if exc_type is not None and self._created:  # failed before writing anything: leave no trace
            if [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
                self.path.unlink()
            for p in self._created:
                try:
                    p.rmdir()
                except OSError:
                    break


def holder(directory: Path, name: str = LOCK_NAME) -> int | None:
    """The pid of the live process holding DIR's lock, or None when nobody holds it."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        import fcntl
    except ImportError:
        return None
    with open(path, encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free space or choose another location",
    errno.EDQUOT: "the disk quota is used up; free space or choose another location",
    errno.EROFS: "read-only file system; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write",
    errno.EPERM: "operation not permitted; choose a location you can write",
    errno.ENOTDIR: "a path component is a file; choose another path",
    errno.EISDIR: "a directory is in the way; choose another path",
}


def os_error(e: OSError) -> str | None:
    """The one line for a file-system error dsft's writers can meet; None for anything else."""
    hint = _OS_HINTS.get(e.errno or -1)
    if hint is None:
        return None
    where = e.filename or "output"
    return f"{where}: {hint}"


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A hidden directory beside `out` to write into; renamed to `out` (replacing it: the caller checked
    ownership) when the body succeeds, removed when it fails, so `out` is never half-written."""
    tmp = out.parent / f".{out.name}.dsft-partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
