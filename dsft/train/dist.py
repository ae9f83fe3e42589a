"""Which process writes: under `accelerate launch` every rank runs the same command, and only the main
one creates the run directory and writes files (the Trainer does the same for its checkpoints)."""

from __future__ import annotations

import os


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
