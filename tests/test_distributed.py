"""Two processes (DDP over gloo on CPU) through `dsft sft --num-processes 2` give the single-process
result at the same global batch, and only the main rank writes the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def test_two_processes_match_one(make_recipe, tmp_path: Path) -> None:
    common = {"adapter": {"routed_experts": {1: [0, 3]}}}
    one = make_recipe("one.yaml", rows=16, output_dir=str(tmp_path / "one"), **common,
                      training={"max_steps": 4, "micro_batch_size": 4, "lr": 1e-2})
    two = make_recipe("two.yaml", rows=16, output_dir=str(tmp_path / "two"), **common,
                      training={"max_steps": 4, "micro_batch_size": 2, "lr": 1e-2})
    outputs = {}
    for name, recipe, extra in (("one", one, []), ("two", two, ["--num-processes", "2"])):
        done = subprocess.run([sys.executable, "-m", "dsft", "sft", "--recipe", str(recipe), *extra],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outputs[name] = done.stdout
    assert outputs["two"].count("dsft sft:") == 1  # one summary: the main rank's
    assert json.loads((tmp_path / "two/run.json").read_text())["status"] == "complete"
    single = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    double = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    assert single.keys() == double.keys() and any("experts.lora_" in k for k in single)
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-3, atol=1e-4)  # reduction order
