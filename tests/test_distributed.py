"""Two processes (DDP over gloo on CPU) give the single-process result at the same global batch, and
only the main rank writes the run: through the shipped multi-node accelerate config (recipes/accelerate/multinode-ddp.yaml, shrunk to one machine) with the
NF4 expert codes sharded across the ranks (`model.shard_experts`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses: in the full run (CI), not in `-m 'not slow'`


REPO = Path(__file__).resolve().parent.parent
MULTINODE = ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/multinode-ddp.yaml"),
             "--num_machines", "1", "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", "0"]


def assert_same_training(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal up to reduction order. Adam moves an element whose gradient is near zero by up to lr per
    step whatever its size, so rounding can shift a single element by a fraction of one step (lr 1e-2):
    each element within a tenth of a step, and on average far closer than that."""
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-3)
    diff = torch.cat([(got[k] - expected[k]).abs().flatten() for k in expected])
    assert diff.mean() < 1e-6, f"mean |difference| {diff.mean():.2e}"


def test_two_processes_match_one(make_recipe, cli, tmp_path: Path) -> None:
    """SFT under DDP once (the other objectives' two-process tests go through `--num-processes`): NF4 codes sharded,
    launched by the shipped multi-node config."""
    common = {"adapter": {"routed_experts": {1: [0, 3]}}, "model": {"quantization": "nf4", "shard_experts": True}}
    one = make_recipe("one.yaml", rows=16, output_dir=str(tmp_path / "one"), **common,
                      training={"max_steps": 4, "micro_batch_size": 4, "lr": 1e-2})
    two = make_recipe("two.yaml", rows=16, output_dir=str(tmp_path / "two"), **common,
                      training={"max_steps": 4, "micro_batch_size": 2, "lr": 1e-2})
    assert cli("sft", "--recipe", one).exit_code == 0  # one process: in-process
    cache = tmp_path / "cache-two"  # the two processes prepare their data afresh
    done = subprocess.run([sys.executable, *MULTINODE, "-m", "dsft", "sft", "--recipe", str(two)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "DSFT_CACHE": str(cache)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = done.stdout
    assert printed.count("dsft sft:") == 1  # one summary: the main rank's
    # the data is tokenized once: by one rank, the other waits for it and maps the same entry
    assert printed.count("data.train: tokenized 16 rows") == 1, printed
    assert printed.count("data.train: tokens from cache (16 rows") == 1, printed
    info = json.loads((tmp_path / "two/run.json").read_text())
    assert info["status"] == "complete" and info["summary"]["processes"] == 2
    assert info["summary"]["expert_codes"] == "sharded"
    single = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    double = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    assert single.keys() == double.keys() and any("experts.lora_" in k for k in single)
    assert_same_training(double, single)


def test_fsdp2_matches_one_process_and_resumes(make_recipe, cli, tmp_path: Path) -> None:
    """The shipped recipes/accelerate/fsdp2.yaml on 2 CPU processes (tests/fsdp_launch.py keeps
    accelerate's FSDP plugin on without GPUs): NF4 codes and the adapter sharded by FSDP2, the adapter
    gathered for saving equals one process's; after losing everything past the first checkpoint,
    `--resume` reloads the sharded adapter and optimizer and ends where the uninterrupted run did."""
    common = {"model": {"quantization": "nf4"}, "adapter": {"routed_experts": {1: [0, 3]}}}
    one = make_recipe("one.yaml", rows=16, output_dir=str(tmp_path / "one"), **common,
                      training={"max_steps": 4, "micro_batch_size": 4, "lr": 1e-2, "save_steps": 2})
    two = make_recipe("two.yaml", rows=16, output_dir=str(tmp_path / "two"), **common,
                      training={"max_steps": 4, "micro_batch_size": 2, "lr": 1e-2, "save_steps": 2})
    fsdp = ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/fsdp2.yaml"),
            "--num_processes", "2", "--main_process_port", "0", str(Path(__file__).with_name("fsdp_launch.py")), "sft"]

    def run(*args: str) -> None:
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert cli("sft", "--recipe", one).exit_code == 0  # one process: in-process
    run(*fsdp, "--recipe", str(two))
    single = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    sharded = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    assert single.keys() == sharded.keys() and any("experts.lora_" in k for k in single)
    assert_same_training(sharded, single)

    shutil.rmtree(tmp_path / "two/checkpoints/checkpoint-4")
    shutil.rmtree(tmp_path / "two/adapter")
    info = json.loads((tmp_path / "two/run.json").read_text())
    info["status"] = "running"
    (tmp_path / "two/run.json").write_text(json.dumps(info))
    run(*fsdp, "--recipe", str(two), "--resume")
    resumed = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    for key in sharded:
        torch.testing.assert_close(resumed[key], sharded[key], rtol=0, atol=1e-6)
