"""`dsft` under accelerate launch for tests/test_distributed.py: under accelerate's FSDP2 on CPU, and several steps
in one process group (one start-up).

accelerate turns FSDP on for GPU process groups only (on CPU its state says MULTI_CPU and the Trainer
wraps the model in DDP). This entry point keeps accelerate's FSDP plugin in force on CPU, so the rest,
accelerate's `fully_shard` wrapping, the Trainer's FSDP checkpoints and dsft's adapter gathering and
resume, runs exactly as it does on GPUs. Used as `accelerate launch --config_file
recipes/accelerate/fsdp2.yaml tests/fsdp_launch.py sft --recipe R`. With DSFT_TEST_THEN='[["sft", ...], ...]' in
the environment the same processes then run further commands; with DSFT_TEST_RESUME=RUN_DIR they then lose everything
the last command's run wrote past its first checkpoint (the finished adapter kept beside the run as
RUN_DIR.uninterrupted) and run that command again with `--resume`; with
DSFT_TEST_SHARDING=OUT:FUSED they then run tests/fsdp_worker.py's cases in its process group (one start-up for all).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import accelerate.state as state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__
_plugin: list = []


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:  # noqa: ANN001 - accelerate's signature
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None) or (_plugin[0] if _plugin else None)
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        _plugin[:] = [plugin]
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


state.AcceleratorState.__init__ = _init_fsdp_on_cpu


def _lose_all_past_the_first_checkpoint(run: Path) -> None:
    """On the main rank: as if killed after the first save (the finished adapter kept beside the run)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        shutil.copytree(run / "adapter", run.with_name(run.name + ".uninterrupted"))
        shutil.rmtree(run / "adapter")
        for late in sorted(run.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[1:]:
            shutil.rmtree(late)
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    dist.barrier()


if __name__ == "__main__":
    from dsft.cli.app import app, main

    sys.argv = ["dsft", *sys.argv[1:]]
    steps = ("DSFT_TEST_THEN", "DSFT_TEST_RESUME", "DSFT_TEST_SHARDING")
    if not any(os.environ.get(step) for step in steps):
        main()  # a plain dsft command
    os.environ["DSFT_HANDLE_SIGNALS"] = "1"
    command = sys.argv[1:]
    app(command, standalone_mode=False)  # dsft's command, then the steps below in its process group
    for command in json.loads(os.environ.get("DSFT_TEST_THEN") or "[]"):  # further commands, each a list of arguments
        app(command, standalone_mode=False)
    if os.environ.get("DSFT_TEST_RESUME"):  # the last command's run, resumed
        _lose_all_past_the_first_checkpoint(Path(os.environ["DSFT_TEST_RESUME"]))
        app([*command, "--resume"], standalone_mode=False)
    if os.environ.get("DSFT_TEST_SHARDING"):
        import fsdp_worker

        fsdp_worker.main(*os.environ["DSFT_TEST_SHARDING"].split(os.pathsep))
