"""The process a user's reward function runs in (started by dsft.train.sandbox; never imports dsft).

It takes the parent's sys.path, imports the user's file, and then answers one call at a time over the pipe
it was given: the arguments arrive pickled (so the function only ever sees copies), the scores go back with
whatever it logged through TRL's `log_extra` / `log_metric`. It ignores SIGINT and SIGTERM (the parent
stops training on them and ends this process itself), and it dies with its parent (PR_SET_PDEATHSIG on
Linux, and a thread watching the parent's pid), so a function that hangs never outlives the run.

Usage: python reward_worker.py READ_FD WRITE_FD
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection


def _die_with_parent() -> None:
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _where(e: BaseException, path: str) -> str:
    """The line of the user's file the exception passed through last."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]
    return f" (line {frames[-1].lineno} of {os.path.basename(path)})" if frames else ""


def _load(conn: Connection, init: dict) -> object:
    sys.path[:] = init["sys_path"]
    path, name = init["path"], init["name"]
    try:
        spec = importlib.util.spec_from_file_location(init["module"], path)
        if spec is None or spec.loader is None:
            raise ImportError("not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[init["module"]] = module
        spec.loader.exec_module(module)
    except BaseException as e:  # noqa: BLE001 - whatever the user's file does on import, SystemExit included
        conn.send(("import_error", f"{type(e).__name__}: {_first_line(e)}{_where(e, path)}"))
        return None
    func = getattr(module, name, None)
    if func is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == init["module"])
        conn.send(("no_function", found))
        return None
    if not callable(func):
        conn.send(("not_callable", type(func).__name__))
        return None
    conn.send(("ready", None))
    return func


def _call(func: object, kwargs: dict, path: str) -> tuple:
    logged: list[tuple] = []
    kwargs["log_extra"] = lambda column, values: logged.append(("extra", str(column), list(values)))
    kwargs["log_metric"] = lambda name, value: logged.append(("metric", str(name), float(value)))
    try:
        out = func(**kwargs)  # type: ignore[operator]
    except SystemExit as e:
        return ("raised", f"SystemExit: sys.exit({e.code!r}) inside the function{_where(e, path)}")
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt and the like are the function's failures too
        return ("raised", f"{type(e).__name__}: {_first_line(e)}{_where(e, path)}")
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        try:
            out = out.tolist()
        except Exception:  # noqa: BLE001
            pass
    return ("ok", out, logged)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    init = inbox.recv()
    func = _load(outbox, init)
    if func is None:
        return
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            return
        reply = _call(func, message, init["path"])
        try:
            outbox.send(reply)
        except Exception as e:  # noqa: BLE001 - an object pickle cannot send
            outbox.send(("unsendable", type(reply[1]).__name__, _first_line(e)))


if __name__ == "__main__":
    main()
