"""Two processes (DDP over gloo on CPU) through `dsft sft --num-processes 2`.

Checked: both ranks train together (each step consumes the global batch), only the main rank writes
the run directory, and the run completes. Not yet checked: equality with a single-process run at the
same global batch (the first-step losses differ; see the open issue's note)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file


def test_two_processes_train_one_run(make_recipe, tmp_path: Path) -> None:
    recipe = make_recipe("two.yaml", rows=16, output_dir=str(tmp_path / "two"),
                         adapter={"routed_experts": {1: [0, 3]}}, training={"max_steps": 4, "micro_batch_size": 2})
    done = subprocess.run([sys.executable, "-m", "dsft", "sft", "--recipe", str(recipe), "--num-processes", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["step"] == 1)
    assert first["epoch"] == 0.25  # 16 rows, 2 ranks x 2 per step: a quarter of the data per step
    assert json.loads((tmp_path / "two/run.json").read_text())["status"] == "complete"
    assert done.stdout.count("dsft sft:") == 1  # one summary: the main rank's
    assert any("experts.lora_" in k for k in load_file(tmp_path / "two/adapter/adapter_model.safetensors"))
