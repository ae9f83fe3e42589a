"""Never lose a user's work: one process per run directory (pid named, freed by kill -9), a full disk
met mid-merge or mid-save, torn metrics after a kill, data that truncation would silently drop, and the
checkpoint check accepting every layout as released. The overwrite and bad-input refusals are the table
in test_bad_inputs.py."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import released_v3
from test_bad_inputs import _snapshot, refused, run_copy

HOLD = ("import sys, time; from pathlib import Path; from dsft.locks import OutputLock; "
        "lock = OutputLock(Path(sys.argv[1]), 'output_dir').__enter__(); print('held', flush=True); time.sleep(120)")


def _hold(directory: Path) -> subprocess.Popen:
    """Another process holding DIR's lock, as a running `dsft sft` does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_in_use_is_refused_naming_its_pid_and_freed_by_kill_9(finished_run: Path, tmp_path: Path, cli) -> None:
    from dsft.locks import holder
    from dsft.runs.run_dir import check_usable

    run = run_copy(tmp_path, finished_run)
    proc = _hold(run)
    try:
        assert holder(run) == proc.pid
        before = _snapshot(run)
        refused(cli("sft", "--recipe", run / "recipe.yaml", "--force"), f"is in use by a running dsft process (pid {proc.pid})")
        refused(cli("sft", "--recipe", run / "recipe.yaml", "--resume"), f"(pid {proc.pid})")
        for command in (["eval"], ["chat", "--prompt", "hi"], ["merge", "--out", tmp_path / "merged", "--force"]):
            refused(cli(command[0], "--adapter", run, *command[1:]), f"the run is still training (dsft process {proc.pid})")
        refused(cli("experts", "plan", "--recipe", run / "recipe.yaml"), f"(pid {proc.pid})")
        assert _snapshot(run) == before and not (tmp_path / "merged").exists()
        # a first training still under way (no adapter/ yet): every command says the same, dpo.init_adapter too
        shutil.rmtree(run / "adapter")
        before = _snapshot(run)
        for command in (["eval"], ["chat", "--prompt", "hi"], ["merge", "--out", tmp_path / "merged"],
                        ["export", "--format", "peft", "--out", tmp_path / "peft"]):
            refused(cli(command[0], "--adapter", run, *command[1:]), f"the run is still training (dsft process {proc.pid})")
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text(json.dumps({"prompt": "Q?", "chosen": "A.", "rejected": "B."}) + "\n")
        dpo = yaml.safe_load((run / "recipe.yaml").read_text())
        dpo.update(data={"train": [str(pairs)], "format": "preference", "max_length": 128},
                   dpo={"init_adapter": str(run), "max_prompt_length": 64}, output_dir=str(tmp_path / "dpo"))
        (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
        refused(cli("dpo", "--recipe", tmp_path / "dpo.yaml"), f"dpo.init_adapter {run}: the run is still training "
                f"(dsft process {proc.pid})")
        assert _snapshot(run) == before and not (tmp_path / "merged").exists() and not (tmp_path / "dpo").exists()
    finally:
        proc.kill()
        proc.wait()
    assert holder(run) is None  # the kernel dropped the lock with the process: nothing stale to remove
    assert check_usable(run, force=False, command="evaluate") == "complete"


def test_full_disk_mid_merge_keeps_finished_shards_and_the_same_command_continues(tmp_path: Path, cli,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from test_merge import _sharded_base, make_run

    from dsft.export import merge as merge_module

    sharded = _sharded_base(tmp_path)
    run = make_run(tmp_path, sharded)
    original, began = merge_module.ShardWriter.write, []

    def write_until_full(self, src, dst):
        began.append(src.name)
        if len(began) == 3:
            dst.write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return original(self, src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(merge_module.ShardWriter, "write", write_until_full)
        result = cli("merge", "--adapter", run, "--out", tmp_path / "merged")
    refused(result, "the disk is full; free space or choose another location")
    partial = tmp_path / ".merged.dsft-partial"
    assert sorted(p.name for p in partial.iterdir() if p.suffix in (".safetensors", ".part")) == sorted(began[:2])
    assert "are kept in" in result.output and "run the same command again to continue" in result.output
    assert not (tmp_path / "merged").exists()
    again = cli("merge", "--adapter", run, "--out", tmp_path / "merged")
    assert again.exit_code == 0, again.output
    assert "2 of" in again.output and (tmp_path / "merged/dsft-merge.json").is_file() and not partial.exists()


def test_full_disk_while_saving_a_checkpoint_records_the_failure(make_recipe, cli, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    recipe = make_recipe(training={"max_steps": 4, "save_steps": 2})
    real_save = torch.save

    def full(obj, f, *a, **k):
        if "checkpoint-" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    # the line follows the trainer's progress bar on the console (issue 19 gives dsft the console)
    errors = [line[line.index("error:"):] for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "checkpoint-2/" in errors[0] and "the disk is full" in errors[0], result.output
    info = json.loads((tmp_path / "run/run.json").read_text())
    assert info["status"] == "failed" and "No space left" in info["error"]
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_a_torn_metrics_line_is_dropped_on_resume_and_the_summary_keeps_the_first_loss(make_recipe, cli,
                                                                                       tmp_path: Path) -> None:
    recipe = make_recipe(training={"max_steps": 10, "save_steps": 5, "logging_steps": 1})
    assert cli("sft", "--recipe", recipe).exit_code == 0
    run = tmp_path / "run"
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    shutil.rmtree(run / "checkpoints/checkpoint-10")  # as if killed between the saves
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "loss": 1.2')  # kill -9 during an append
    result = cli("sft", "--recipe", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert "dropped 1 torn or unreadable line" in result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 11))  # one row per step: 1-5 kept, 6-10 logged again by the resumed run
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["first_loss"] == first and summary["last_loss"] == rows[-1].get("loss", summary["last_loss"])


def test_truncation_is_counted_in_run_json(make_recipe, cli, tmp_path: Path) -> None:
    """(The counts themselves equal the per-row reference's at every max_length: tests/test_prepared.py.)"""
    recipe = make_recipe(data={"max_length": 40}, training={"max_steps": 1})
    assert cli("sft", "--recipe", recipe).exit_code == 0
    summary = json.loads((tmp_path / "run/run.json").read_text())["summary"]
    cut = summary["truncation"]
    assert cut["rows"] == 16 and cut["truncated"] > 0 and cut["loss_tokens"] < cut["loss_tokens_before"]
    assert summary["loss_tokens"] == cut["loss_tokens"]  # after truncation, as the trainer sees them


def test_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path: Path) -> None:
    from dsft.data.formats import load_conversations

    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,completion\nWhat is a deed?,A signed instrument.\n")
    rows = load_conversations([str(path)], "prompt_completion")
    assert rows == [[{"role": "user", "content": "What is a deed?"}, {"role": "assistant", "content": "A signed instrument."}]]


def test_the_checkpoint_check_accepts_every_layout_as_released(tmp_path: Path) -> None:
    """bf16 per-expert V2, fused experts, FP8 V3 with partial blocks + MTP + padded vocab, sharded, Mixtral's
    old names, Qwen: accepted; and the same V3 with one block scale of the wrong grid refused."""
    from conftest import fused_checkpoint
    from safetensors.torch import load_file, save_file

    from dsft.errors import DsftError
    from dsft.models.check import check_checkpoint
    from dsft.models.load import resolve_model_path

    for name in ("tiny-deepseek-v2", "tiny-deepseek-v3", "tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"):
        check_checkpoint(resolve_model_path(f"builtin:{name}"))
    check_checkpoint(fused_checkpoint(tmp_path))
    v3 = released_v3(tmp_path)
    check_checkpoint(v3)
    assert "kv_a_proj_with_mqa.weight_scale_inv" in (v3 / "model.safetensors.index.json").read_text()
    shard = next(v3.glob("model-*.safetensors"))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("kv_a_proj_with_mqa.weight_scale_inv"))
    tensors[key] = tensors[key][:1]  # the partial edge block's row of scales dropped
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(DsftError, match="its block scale is"):
        check_checkpoint(v3)


def test_a_released_layout_trains(tmp_path: Path, make_recipe, cli) -> None:
    """The FP8 / MTP / padded-vocab / sharded V3 passes the preflight and trains a step."""
    v3 = released_v3(tmp_path)
    result = cli("sft", "--recipe", make_recipe(model={"path": str(v3)}, training={"max_steps": 1}))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run/run.json").read_text())["status"] == "complete"


def test_merge_replaces_only_its_own_output_with_force(finished_run: Path, tmp_path: Path, cli) -> None:
    run = run_copy(tmp_path, finished_run)
    out = tmp_path / "merged"
    assert cli("merge", "--adapter", run, "--out", out).exit_code == 0
    first = (out / "dsft-merge.json").read_text()
    time.sleep(0.01)
    again = cli("merge", "--adapter", run, "--out", out, "--force")
    assert again.exit_code == 0, again.output
    assert (out / "dsft-merge.json").read_text() == first
    assert not list(tmp_path.glob(".merged.dsft-partial"))


def test_sft_force_replaces_a_dsft_run_and_keeps_its_routing_cache(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(training={"max_steps": 1})
    assert cli("sft", "--recipe", recipe).exit_code == 0
    (tmp_path / "run/routing").mkdir(exist_ok=True)
    (tmp_path / "run/routing/profile.json").write_text("{}")
    again = cli("sft", "--recipe", recipe, "--force")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "run/routing/profile.json").read_text() == "{}"
    assert json.loads((tmp_path / "run/run.json").read_text())["status"] == "complete"
