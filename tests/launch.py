"""Several `dsft` commands in one process group (one start-up of the stack per rank), for tests/test_distributed.py.
Used as `accelerate launch ... tests/launch.py sft --recipe R`: the command; then, with DSFT_TEST_THEN='[["sft", ...],
...]' in the environment, further commands; with DSFT_TEST_RESUME=RUN_DIR, the last command's run loses everything
it wrote past its first checkpoint (the finished adapter kept beside it as RUN_DIR.uninterrupted) and the command
runs again with `--resume`, then loses its adapter (everything past its last checkpoint) and resumes again; with DSFT_TEST_SHARDING=OUT:FUSED, tests/fsdp_worker.py's cases in the same group.
Each command runs as `dsft` runs it (dsft.cli.app), in the ranks accelerate launch started."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path


def _lose_all_past(run: Path, keep: str) -> None:
    """On the main rank: as if killed after the `keep` ("first" or "last") save: the adapter and any later checkpoint
    gone, the run marked running (the first time, the finished adapter kept beside it as RUN.uninterrupted)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        if not run.with_name(run.name + ".uninterrupted").exists():
            shutil.copytree(run / "adapter", run.with_name(run.name + ".uninterrupted"))
        shutil.rmtree(run / "adapter")
        checkpoints = sorted(run.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for late in checkpoints[1:] if keep == "first" else []:
            shutil.rmtree(late)
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    dist.barrier()


if __name__ == "__main__":
    import gc

    import dsft.train.pipeline  # noqa: F401
    from dsft.cli.app import app, main

    gc.freeze()  # the imports out of every full collection (one at the start of each training: conftest.py)

    sys.argv = ["dsft", *sys.argv[1:]]
    steps = ("DSFT_TEST_THEN", "DSFT_TEST_RESUME", "DSFT_TEST_SHARDING")
    if not any(os.environ.get(step) for step in steps):
        main()  # a plain dsft command
    os.environ["DSFT_HANDLE_SIGNALS"] = "1"
    command = sys.argv[1:]
    app(command, standalone_mode=False)  # dsft's command, then the steps below in its process group
    for command in json.loads(os.environ.get("DSFT_TEST_THEN") or "[]"):  # further commands, each a list of arguments
        app(command, standalone_mode=False)
    if os.environ.get("DSFT_TEST_RESUME"):  # the last command's run, resumed from its first save, then from its last
        run = Path(os.environ["DSFT_TEST_RESUME"])
        for keep in ("first", "last"):
            _lose_all_past(run, keep)
            app([*command, "--resume"], standalone_mode=False)
    if os.environ.get("DSFT_TEST_SHARDING"):
        import fsdp_worker

        fsdp_worker.main(*os.environ["DSFT_TEST_SHARDING"].split(os.pathsep))
