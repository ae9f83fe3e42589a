"""One process at a time: POSIX advisory locks, which the kernel drops when the process dies (kill -9
included), so there is never a stale lock to clean up. Two kinds: `OutputLock` refuses a second process and
names the holder's pid (run directories, merge / export / convert outputs); `exclusive` makes it wait (the
prepared-data cache's builder per entry, the built-in models' files). No torch: the lowest layer."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dsft.errors import DsftError

LOCK_NAME = ".dsft.lock"


@contextlib.contextmanager
def exclusive(lock: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """One process at a time through the body, the others waiting (`on_wait` is called once when one has to): an
    advisory lock the kernel drops when the process dies (never stale). The lock file is removed while still
    held, so none is left behind; a waiter that then gets the lock of the removed file sees another inode at
    the path and locks that one instead. A no-op where fcntl does not exist. (OutputLock is the other kind:
    it refuses instead of waiting, and names the holder.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    waited = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


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
        self.created = [p for p in (directory, *directory.parents) if not p.exists()]
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
            for _ in range(50):  # the holder writes its pid right after it takes the lock
                if pid is None or pid > 0:
                    break
                time.sleep(0.01)
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
        if exc_type is not None and self.created:  # failed before writing anything: leave no trace
            if [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
                self.path.unlink()
            for p in self.created:
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
