"""User-facing errors: what the CLI prints as one line each and exits 2 on."""

from __future__ import annotations

from typing import Any


def shown(value: Any, limit: int = 80) -> str:
    """A value as an error message shows it: its repr cut to `limit` characters, a long list or mapping by its
    size (never a whole expanded document echoed back)."""
    text = repr(value) if not isinstance(value, (dict, list)) or len(value) < 50 else f"<{type(value).__name__} of {len(value)}>"
    return text if len(text) <= limit else text[:limit] + "..."


class DsftError(Exception):
    """A problem with the user's input, reported without a traceback (exit code 2)."""

    exit_code = 2
    label = "error"  # how the CLI starts its lines ("stopped" for a run stopped on a signal: not an error)

    def __init__(self, *lines: str) -> None:
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))
