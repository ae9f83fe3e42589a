"""`dsft` under accelerate's FSDP2 on CPU, for tests/test_distributed.py.

accelerate turns FSDP on for GPU process groups only (on CPU its state says MULTI_CPU and the Trainer
wraps the model in DDP). This entry point keeps accelerate's FSDP plugin in force on CPU, so the rest,
accelerate's `fully_shard` wrapping, the Trainer's FSDP checkpoints and dsft's adapter gathering and
resume, runs exactly as it does on GPUs. Used as `accelerate launch --config_file
recipes/accelerate/fsdp2.yaml tests/fsdp_launch.py sft --recipe R`. With DSFT_TEST_SHARDING=OUT:FUSED in the
environment, the same processes then run tests/fsdp_worker.py's cases in its process group (one start-up for both).
"""

from __future__ import annotations

import os
import sys

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

if __name__ == "__main__":
    from dsft.cli.app import app, main

    sys.argv = ["dsft", *sys.argv[1:]]
    if not os.environ.get("DSFT_TEST_SHARDING"):
        main()
    os.environ["DSFT_HANDLE_SIGNALS"] = "1"
    app(standalone_mode=False)  # dsft's command, then the sharding cases in the same process group
    import fsdp_worker

    fsdp_worker.main(*os.environ["DSFT_TEST_SHARDING"].split(os.pathsep))
