"""User-facing errors: what the CLI prints as one line each and exits 2 on."""

from __future__ import annotations


class DsftError(Exception):
    """A problem with the user's input, reported without a traceback (exit code 2)."""

    exit_code = 2

    def __init__(self, *lines: str) -> None:
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))
