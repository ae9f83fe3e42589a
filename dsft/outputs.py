"""What every dsft writer obeys: never touch what dsft did not make, one process per output, and
file-system errors reported as one line.

- `check_location`: before anything is created, an output path may not be a file, sit under a file,
  equal or contain any input of the command, or lie inside a model checkpoint, an adapter directory or a
  run's checkpoints (`protected`: one rule for every writer); its nearest existing
  parent must take a new entry (probed by making and removing one, since CI runs as root and
  permission bits say nothing there).
- one process per output: dsft.locks (`OutputLock`, `exclusive`).
- `resolve_output`: an output path with `~` and every symbolic link resolved, before any of the above
  decides anything (a link is written at its target, never deleted through).
- `staged` / `replace_dir`: an output written beside its final place under a lock, then swapped in (the
  old one moved aside, removed only once the new one is in place); `check_replaceable`: --force replaces
  only an output whose record lists every entry in it.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dsft.errors import DsftError
from dsft.locks import LOCK_NAME, OutputLock

WEIGHT_MARKERS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")


def is_main() -> bool:
    """Which process writes: under `accelerate launch` every rank runs the same command, and only the main one
    creates the run directory and writes files (the Trainer does the same for its checkpoints)."""
    return int(os.environ.get("RANK", "0")) == 0


def cache_root() -> Path:
    """Where dsft keeps what it can rebuild (built-in models, prepared data): DSFT_CACHE, else
    $XDG_CACHE_HOME/dsft, else ~/.cache/dsft."""
    root = os.environ.get("DSFT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsft"
    return Path(os.path.expanduser(str(root)))


def cache_error(problem: str, fix: str = "point DSFT_CACHE at a writable directory (unset, it is ~/.cache/dsft)") -> DsftError:
    """A problem with the cache directory as one line naming DSFT_CACHE (or the default it stands for)."""
    where = f"DSFT_CACHE={os.environ['DSFT_CACHE']}" if os.environ.get("DSFT_CACHE") else f"dsft's cache {cache_root()}"
    return DsftError(f"{where}: {problem}; {fix}")


def human_size(n: float) -> str:
    """Bytes in the unit that fits: 512 B, 3.4 MiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def is_checkpoint(path: Path) -> bool:
    """A model checkpoint directory: config.json beside weights (any safetensors, .bin, .pt/.pth or GGUF file,
    an index or none: `.bin` releases often ship without one)."""
    if not (path / "config.json").is_file():
        return False
    if any((path / m).is_file() for m in WEIGHT_MARKERS):
        return True
    try:
        return any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in path.iterdir())
    except OSError:
        return False


def protected(path: Path) -> str | None:
    """What `path` is, when it is a directory no output may be written inside: a model checkpoint, an adapter
    (adapter_config.json: a run's adapter/ or any PEFT adapter), a run's checkpoints/ or one checkpoint in it."""
    if not path.is_dir():
        return None
    if is_checkpoint(path):
        return "model checkpoint"
    if (path / "adapter_config.json").is_file():
        return "adapter directory"
    if path.name == "checkpoints" and (path.parent / "run.json").is_file():
        return "run's checkpoints directory"
    if path.name.startswith("checkpoint-") and (path / "trainer_state.json").is_file():
        return "training checkpoint"
    return None


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
    itself = [resolved] if not replaceable and resolved.is_dir() and is_checkpoint(resolved) else []
    for parent in (*itself, *resolved.parents):  # an output itself may be an adapter: an export dsft replaces
        what = protected(parent)
        if what:
            raise DsftError(f"{key}: {out} is inside the {what} {parent}; dsft writes nothing inside a model checkpoint, "
                            "an adapter or a run's checkpoints: choose a directory outside it")
    check_writable(out_abs, key)


def check_replaceable(out: Path, record: str, what: str, force: bool) -> None:
    """An existing, non-empty `out` is replaced only with --force, and only when dsft wrote all of it: its
    `record` (the file every dsft writer leaves in its output) is there and lists every other entry
    (`files`), so a user's file added to an output of dsft's stops the replacement."""
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if record not in entries:
        raise DsftError(f"--out {out} holds files dsft did not write ({', '.join(entries[:3])}); --force replaces only "
                        f"{what} dsft wrote ({record}): choose another --out")
    try:
        written = json.loads((out / record).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        written = None
    if isinstance(written, list):
        foreign = [name for name in entries if name not in {*written, record}]
        if foreign:
            raise DsftError(f"--out {out} holds files dsft did not write ({', '.join(foreign[:3])}); --force replaces "
                            f"only {what} dsft wrote: move them out or choose another --out")
    if not force:
        raise DsftError(f"--out {out} already exists; pass --force to replace it or choose another directory")


def written_files(directory: Path) -> list[str]:
    """The entries of a finished output directory, as its record lists them (check_replaceable)."""
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME)


def check_free(path: Path, needed: int, key: str, need: str) -> None:
    """The one free-space check: `needed` bytes at `path` (or where it would be created), else one line: `need`
    (what needs the room, with `{size}` where the size goes), what is free there, and the fix naming option `key`."""
    probe = nearest_existing(Path(os.path.abspath(path)))
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DsftError(f"{need.format(size=human_size(needed))}, {probe} has {human_size(free)}; free space or "
                        f"choose another {key}")


def write_atomic(path: Path, content: str | bytes | Callable[[Path], None], unique: bool = False) -> Path:
    """The one way dsft writes a file: its content beside it as `.NAME.tmp` (`.NAME.tmp-PID` where two processes
    may write the same file: a cache entry's meta.json), then renamed over `path`. A reader never sees half a
    file, and a failure (a full disk) leaves no temporary behind. `content` is text, bytes, or a function that
    writes the temporary path it is given (a figure's savefig)."""
    tmp = path.with_name(f".{path.name}.tmp" + (f"-{os.getpid()}" if unique else ""))
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


def resolve_output(path: Path | str, key: str) -> Path:
    """The directory a writer really writes: `~` expanded and every symbolic link resolved (a link, or a
    link above it, is written at its target under the same rules as any path; a dangling link's target is
    created; the link itself is never deleted through). A link loop is refused."""
    expanded = Path(os.path.expanduser(str(path)))
    try:
        return Path(os.path.abspath(expanded)).resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11 raises RuntimeError on a loop
        raise DsftError(f"{key}: {path} is a loop of symbolic links ({e}); point it at a real directory") from None


def partial_dir(out: Path) -> Path:
    """The hidden staging directory beside `out` (dsft's own name: only dsft writes there)."""
    return out.parent / f".{out.name}.dsft-partial"


def clear_dir(directory: Path, keep: tuple[str, ...] = (LOCK_NAME,)) -> None:
    """Empty a staging directory of dsft's (its lock file kept)."""
    for p in directory.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def follow_umask(directory: Path) -> None:
    """Give a staged directory and everything in it the modes the user's umask gives new files and
    directories (safetensors writes 0600 and tempfile.mkdtemp makes 0700). Links are left alone."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
    os.chmod(directory, 0o777 & ~mask)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished directory `tmp` at `out`: a previous `out` (the caller checked it may go) is moved
    aside, `tmp` renamed into place, and only then the old one removed; if the rename fails the old one is
    put back. A symbolic link at `out` is replaced as a link, never followed. Modes follow the umask."""
    follow_umask(tmp)
    old = None
    if out.is_symlink() or out.exists():
        old = out.parent / f".{out.name}.dsft-old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(out: Path, key: str = "--out", recheck: Callable[[], None] | None = None) -> Iterator[Path]:
    """A hidden directory beside `out` to write into, locked against a second dsft process writing the same
    output; `recheck` (the caller's ownership check) runs again under the lock, since another process may
    have finished an output there meanwhile. The directory is renamed to `out` (replace_dir) when the body
    succeeds and removed when anything fails, so `out` is never half-written and no finished output is left
    hidden beside it."""
    tmp = partial_dir(out)
    busy = f"{key} {out}: another dsft process is writing it (its staging directory {tmp} is locked); wait for it " \
           f"to finish or choose another {key}"
    lock = OutputLock(tmp, key, busy=busy).__enter__()  # a second writer is refused here, before anything changes
    try:
        clear_dir(tmp)  # what a killed earlier attempt left in dsft's staging directory
        if recheck is not None:
            recheck()
        yield tmp
        replace_dir(tmp, out)
        (out / LOCK_NAME).unlink(missing_ok=True)  # renamed along with the directory; held until here
    except BaseException:
        with contextlib.suppress(OSError):  # removed while still locked, so no second writer loses its work
            clear_dir(tmp, keep=())
            tmp.rmdir()
            for parent in lock.created[1:]:  # directories made for a new output's path
                parent.rmdir()
        raise
    finally:
        lock.__exit__(None)
