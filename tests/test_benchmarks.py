"""benchmarks/moe_sft.py stays runnable: its --smoke mode runs every case on tiny DeepSeek-V2 shapes
(on CPU here), so a GPU session spends its minutes measuring rather than fixing the script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses: in the full run (CI), not in `-m 'not slow'`

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "moe_sft.py"
DATA_SCRIPT = SCRIPT.with_name("data.py")
CASES = ["stock-bf16", "stock-nf4", "dsft-bf16", "dsft-nf4"]


def test_benchmark_smoke_runs_every_case(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--cases", ",".join(CASES), "--batches", "2",
                           "--seq", "64", "--steps", "1", "--warmup", "0", "--dpo",
                           "--checkpoint", str(tmp_path / "ckpt"), "--json", str(rows_file)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads(rows_file.read_text())}
    assert set(rows) == {*CASES, "dsft-bf16-dpo", "dsft-nf4-dpo"}
    table = done.stdout[done.stdout.index("case "):].splitlines()
    for case, row in rows.items():
        assert row["tokens_per_s"] > 0 and "OOM" not in row.get("note", ""), row
        assert any(line.split()[:1] == [case] for line in table), f"{case} missing from the table"
    # One step from a zero-initialised adapter: the loss is the base model's. dsft's loader and grouped
    # experts compute what transformers computes; NF4 moves it only by the quantization error.
    assert rows["dsft-bf16"]["loss"] == pytest.approx(rows["stock-bf16"]["loss"], rel=1e-5)
    for case in ("stock-nf4", "dsft-nf4"):
        assert math.isfinite(rows[case]["loss"])
        assert rows[case]["loss"] == pytest.approx(rows["stock-bf16"]["loss"], rel=1e-2)


def test_merge_benchmark_smoke_runs_every_case(tmp_path: Path) -> None:
    """benchmarks/merge.py --smoke builds bf16 and FP8 (V3 layout) checkpoints and times copy and merges."""
    rows_file = tmp_path / "rows.json"
    script = SCRIPT.parent / "merge.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--json", str(rows_file)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert [(r["base"], r["case"]) for r in rows] == [("bf16", "copy"), ("bf16", "merge"), ("fp8", "copy"),
                                                      ("fp8", "merge"), ("fp8", "merge-fp8")]
    for r in rows:
        assert r["seconds"] > 0 and r["mb"] > 1
        if r["case"] != "copy":
            assert r["rss"] > 0 and r["retention"] == pytest.approx(1.0, abs=0.01)
    assert "x copy" in done.stdout and "peak RSS MB" in done.stdout


def test_benchmark_smoke_runs_the_dense_case(tmp_path: Path) -> None:
    """The dense case (DeepSeek LLM layout, NF4, LoRA on attention and MLP): stock PEFT + bitsandbytes and
    dsft at the same settings, with the ratio line; from a zero-initialised adapter both start at the
    NF4 base's loss."""
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--cases", "stock-dense-nf4,dsft-dense-nf4",
                           "--batches", "2", "--seq", "64", "--steps", "1", "--warmup", "0",
                           "--checkpoint", str(tmp_path / "ckpt"), "--json", str(rows_file)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads(rows_file.read_text())}
    assert set(rows) == {"stock-dense-nf4", "dsft-dense-nf4"} and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["dsft-dense-nf4"]["loss"] == pytest.approx(rows["stock-dense-nf4"]["loss"], rel=1e-3)
    assert "dsft-dense-nf4 / stock-dense-nf4 at 2x64:" in done.stdout


def test_data_benchmark_smoke_runs_every_case(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(DATA_SCRIPT), "--smoke", "--dir", str(tmp_path), "--json", str(rows_file)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads(rows_file.read_text())}
    assert set(rows) == {"baseline", "dsft-cold", "dsft-cold-1", "dsft-warm", "dsft-check", "dsft-resume", "dsft-before"}
    assert "checked at" in rows["dsft-check"]["note"]
    # every dsft case holds the baseline's tokens (the mask is extra); the warm ones are hits
    assert {r["tokens"] for c, r in rows.items() if c != "dsft-before"} == {rows["baseline"]["tokens"]}
    assert rows["dsft-warm"]["seconds"] < rows["dsft-cold-1"]["seconds"]
    assert "vs baseline" in done.stdout and "the int32 size of its" in done.stdout


def test_preference_benchmark_smoke_times_every_objective(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("preference.py")), "--smoke", "--json", str(rows_file)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["objective"]: r for r in json.loads(rows_file.read_text())}
    assert set(rows) == {"dpo", "orpo", "simpo", "kto"} and all(r["median_s"] > 0 for r in rows.values())
    assert "x dpo" in done.stdout
