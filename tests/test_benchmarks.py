"""benchmarks/moe_sft.py stays runnable: its --smoke mode runs every case on tiny DeepSeek-V2 shapes
(on CPU here), so a GPU session spends its minutes measuring rather than fixing the script."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmarks: in the full run (CI), not in `-m 'not slow'`

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "moe_sft.py"
DATA_SCRIPT = SCRIPT.with_name("data.py")
CASES = ["stock-bf16", "stock-nf4", "dsft-bf16", "dsft-nf4"]
DENSE = ["stock-dense-nf4", "dsft-dense-nf4"]


def run_script(script: Path, capsys: pytest.CaptureFixture, *argv: object) -> str:
    """`python SCRIPT ARGV` run in this process (the libraries are imported already), its environment restored
    after; what it printed on stdout."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = dict(os.environ)
    try:
        module.main([str(a) for a in argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return capsys.readouterr().out


def test_benchmark_smoke_runs_every_case(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every MoE case (and DPO), and the dense case (DeepSeek LLM layout, NF4, LoRA on attention and MLP: stock
    PEFT + bitsandbytes and dsft at the same settings), in one run of the script."""
    rows_file = tmp_path / "rows.json"
    stdout = run_script(SCRIPT, capsys, "--smoke", "--cases", ",".join([*CASES, *DENSE]), "--batches", "2", "--seq", "64",
                        "--steps", "1", "--warmup", "0", "--dpo", "--checkpoint", tmp_path / "ckpt", "--json", rows_file)
    rows = {r["case"]: r for r in json.loads(rows_file.read_text())}
    assert set(rows) == {*CASES, *DENSE, "dsft-bf16-dpo", "dsft-nf4-dpo"}
    table = stdout[stdout.index("case "):].splitlines()
    for case, row in rows.items():
        assert row["tokens_per_s"] > 0 and "OOM" not in row.get("note", ""), row
        assert any(line.split()[:1] == [case] for line in table), f"{case} missing from the table"
    # One step from a zero-initialised adapter: the loss is the base model's. dsft's loader and grouped
    # experts compute what transformers computes; NF4 moves it only by the quantization error.
    assert rows["dsft-bf16"]["loss"] == pytest.approx(rows["stock-bf16"]["loss"], rel=1e-5)
    for case in ("stock-nf4", "dsft-nf4"):
        assert math.isfinite(rows[case]["loss"])
        assert rows[case]["loss"] == pytest.approx(rows["stock-bf16"]["loss"], rel=1e-2)
    # the dense case: from a zero-initialised adapter both start at the NF4 base's loss, with the ratio line
    assert rows["dsft-dense-nf4"]["loss"] == pytest.approx(rows["stock-dense-nf4"]["loss"], rel=1e-3)
    assert "dsft-dense-nf4 / stock-dense-nf4 at 2x64:" in stdout


def test_merge_benchmark_smoke_runs_every_case(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """benchmarks/merge.py --smoke builds bf16 and FP8 (V3 layout) checkpoints and times copy and merges."""
    rows_file = tmp_path / "rows.json"
    stdout = run_script(SCRIPT.parent / "merge.py", capsys, "--smoke", "--json", rows_file)
    rows = json.loads(rows_file.read_text())
    assert [(r["base"], r["case"]) for r in rows] == [("bf16", "copy"), ("bf16", "merge"), ("fp8", "copy"),
                                                      ("fp8", "merge"), ("fp8", "merge-fp8")]
    for r in rows:
        assert r["seconds"] > 0 and r["mb"] > 1
        if r["case"] != "copy":
            assert r["rss"] > 0 and r["retention"] == pytest.approx(1.0, abs=0.01)
    assert "x copy" in stdout and "peak RSS MB" in stdout


def test_data_benchmark_smoke_runs_every_case(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows_file = tmp_path / "rows.json"
    stdout = run_script(DATA_SCRIPT, capsys, "--smoke", "--dir", tmp_path, "--json", rows_file)
    rows = {r["case"]: r for r in json.loads(rows_file.read_text())}
    assert set(rows) == {"baseline", "dsft-cold", "dsft-cold-1", "dsft-warm", "dsft-check", "dsft-resume", "dsft-before"}
    assert "checked at" in rows["dsft-check"]["note"]
    # every dsft case holds the baseline's tokens (the mask is extra); the warm ones are hits
    assert {r["tokens"] for c, r in rows.items() if c != "dsft-before"} == {rows["baseline"]["tokens"]}
    assert rows["dsft-warm"]["seconds"] < rows["dsft-cold-1"]["seconds"]
    assert "vs baseline" in stdout and "the int32 size of its" in stdout


def test_preference_benchmark_smoke_times_every_objective(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows_file = tmp_path / "rows.json"
    stdout = run_script(SCRIPT.with_name("preference.py"), capsys, "--smoke", "--json", rows_file)
    rows = {r["objective"]: r for r in json.loads(rows_file.read_text())}
    assert set(rows) == {"dpo", "orpo", "simpo", "kto"} and all(r["median_s"] > 0 for r in rows.values())
    assert "x dpo" in stdout


def test_scale_out_benchmark_smoke_measures_one_rank(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """benchmarks/scale_out.py --smoke --procs 1 (in this process; 2 and 4 processes run by hand, docs/multi-gpu.md):
    the checkpoint is built, the loader's reads are counted (the experts and the rest), the model trains, and every
    byte a rank holds is reported against one process."""
    rows_file = tmp_path / "rows.json"
    stdout = run_script(SCRIPT.with_name("scale_out.py"), capsys, "--smoke", "--procs", "1", "--steps", "1",
                        "--dir", tmp_path / "ckpt", "--json", rows_file)
    (row,) = json.loads(rows_file.read_text())
    assert row["procs"] == 1 and row["tokens_per_s"] > 0
    checkpoint = sum(f.stat().st_size for f in (tmp_path / "ckpt").glob("*.safetensors"))
    # every tensor of the checkpoint read once (its files less their headers)
    assert row["read_expert_bytes"] + row["read_other_bytes"] == pytest.approx(checkpoint, rel=0.02)
    assert row["expert_base_bytes"] > 0 and row["expert_lora_bytes"] > 0
    assert row["optimizer_bytes"] > 2 * row["expert_lora_bytes"]  # AdamW's two states of every trainable tensor
    assert "expert NF4 MiB" in stdout and stdout.count("\n    1    0 |") == 1
