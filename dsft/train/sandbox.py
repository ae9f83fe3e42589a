"""A user's reward function, run in a process of its own (dsft/train/reward_worker.py).

A reward function is user code: it can raise, call `sys.exit` or `os._exit`, hang, crash the interpreter,
print, or change the lists it is given. In its own process each of those is the function's failure, named,
and never dsft's: the arguments reach it pickled (copies), a call that takes longer than the time limit
(`grpo.reward_timeout`) ends the process, and a process that exits is reported with its exit code. What it
prints goes to run.log (logger `dsft.rewards`), not to dsft's console. The process imports the file once and
keeps it for the run, so module state persists between calls as it would in-process.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from dsft.errors import DsftError

WORKER = Path(__file__).with_name("reward_worker.py")
LOG = logging.getLogger("dsft.rewards")


class FunctionFailed(DsftError):
    """The function (or its process) failed: `reason` says how, worded for 'grpo.rewards[i] (name): REASON'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "its process stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"its process was killed by {name}"
    return f"exited (code {code}: sys.exit or os._exit inside the function or its imports)"


class UserFunction:
    """`FILE.py:NAME` in its own process; `__call__` sends one call and waits at most `timeout` seconds."""

    def __init__(self, path: Path, name: str, timeout: float, label: str) -> None:
        self.path, self.name, self.timeout, self.label = path.resolve(), name, timeout, label
        self.process: subprocess.Popen | None = None
        self._start()

    # -- the process

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER), str(to_child_r), str(to_parent_w)], pass_fds=(to_child_r, to_parent_w),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=os.getcwd())
        finally:
            os.close(to_child_r)
            os.close(to_parent_w)
        self.outbox, self.inbox = Connection(to_child_w, readable=False), Connection(to_parent_r, writable=False)
        threading.Thread(target=self._relay, args=(self.process.stdout,), daemon=True).start()
        atexit.register(self.close)
        self.outbox.send({"path": str(self.path), "name": self.name, "sys_path": list(sys.path),
                          "module": f"dsft_reward_{abs(hash(str(self.path))):x}"})
        kind, detail = self._receive("importing the file")
        if kind == "import_error":
            self.close()
            raise FunctionFailed(f"{self.path} does not import ({detail}); fix the file")
        if kind == "no_function":
            self.close()
            raise FunctionFailed(f"{self.path} has no function {self.name!r}" + (f" (it has {', '.join(detail)})" if detail else ""))
        if kind == "not_callable":
            self.close()
            raise FunctionFailed(f"{self.path}:{self.name} is not a function (it is of type {detail})")

    def _relay(self, stream: Any) -> None:
        """What the function prints, line by line, to run.log."""
        for raw in iter(stream.readline, b""):
            LOG.info("%s: %s", self.label, raw.decode("utf-8", "replace").rstrip())
        stream.close()

    def _receive(self, doing: str) -> tuple:
        """The worker's next reply, or FunctionFailed when it exits or takes longer than the time limit."""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if self.inbox.poll(max(0.0, min(left, 0.5))):
                    return self.inbox.recv()
            except (EOFError, OSError):
                code = self.process.wait(timeout=5) if self.process else None
                self.close()
                raise FunctionFailed(_exit_reason(code)) from None
            if self.process is not None and self.process.poll() is not None and not self.inbox.poll(0):
                code = self.process.returncode
                self.close()
                raise FunctionFailed(_exit_reason(code))
            if left <= 0:
                self.close()
                raise FunctionFailed(f"did not return within {self.timeout:g} s {doing} (grpo.reward_timeout: make "
                                     "it faster or raise the limit)")

    def close(self) -> None:
        """End the process (it may be stuck inside the function: it is killed, not asked)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        for conn in (getattr(self, "outbox", None), getattr(self, "inbox", None)):
            if conn is not None:
                conn.close()

    # -- a call

    def __call__(self, **kwargs: Any) -> Any:
        if self.process is None:
            raise FunctionFailed("its process has ended after an earlier failure")
        log_extra, log_metric = kwargs.pop("log_extra", None), kwargs.pop("log_metric", None)
        state = kwargs.pop("trainer_state", None)
        if state is not None:
            kwargs["trainer_state"] = _picklable(state)
        try:
            self.outbox.send(kwargs)
        except (OSError, EOFError):
            code = self.process.poll() if self.process else None
            self.close()
            raise FunctionFailed(_exit_reason(code)) from None
        reply = self._receive("for one batch")
        kind = reply[0]
        if kind == "raised":
            raise FunctionFailed(f"raised {reply[1]}")
        if kind == "unsendable":
            raise FunctionFailed(f"returned a {reply[1]}, which cannot be sent back ({reply[2]}); return a list of floats")
        _, out, logged = reply
        for what, name, value in logged:
            target = log_extra if what == "extra" else log_metric
            if target is not None:
                target(name, value)
        return out


def _picklable(value: Any) -> Any:
    """TRL's trainer_state for the function: the TrainerState itself when it pickles, else its fields."""
    try:
        pickle.dumps(value)
        return value
    except Exception:  # noqa: BLE001
        import dataclasses

        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else None
