"""Trust only what was checked: resume at the very last step, an adapter read against its tensors, the
base's identity, writers through symbolic links, tracker directories, convert's weight files, bounded
inputs. Each rule's refusals are rows of tests/test_bad_inputs.py; here is what works, and the checks
broken on purpose."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import legal_rows, write_jsonl
from dsft.models.load import resolve_model_path
from test_bad_inputs import _snapshot, refused, run_copy


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter/adapter_model.safetensors")


def _steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def _killed_after_the_last_checkpoint(run: Path) -> None:
    """What kill -9 right after the final checkpoint leaves: status running, no published adapter."""
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    shutil.rmtree(run / "adapter")


@pytest.mark.parametrize("training", [{"max_steps": 5, "save_steps": 5}, {"epochs": 1.5, "save_steps": 3}],
                         ids=["max-steps-mid-epoch", "fractional-epochs"])
def test_resume_from_the_last_checkpoint_completes_without_training(training: dict, make_recipe, cli,
                                                                     tmp_path: Path) -> None:
    """Before: the Trainer trained one step past max_steps (6 of 5), hidden under cosine's zero lr; with a
    constant lr the adapter differed from the uninterrupted run's by 0.01."""
    settings = {"scheduler": "constant", "warmup_ratio": 0.0, "lr": 1e-2, "logging_steps": 1, "micro_batch_size": 4,
                "max_steps": None, **training}
    whole = make_recipe("whole.yaml", rows=8, output_dir=str(tmp_path / "whole"), training=settings)
    assert cli("sft", "--recipe", whole).exit_code == 0
    steps = _steps(tmp_path / "whole")
    killed = make_recipe("killed.yaml", rows=8, output_dir=str(tmp_path / "killed"), training=settings)
    assert cli("sft", "--recipe", killed).exit_code == 0
    _killed_after_the_last_checkpoint(tmp_path / "killed")
    resumed = cli("sft", "--recipe", killed, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"step {max(steps)} of {max(steps)} (its last: the run completes without training)" in resumed.output
    assert "data.train: tokens from cache" in resumed.output  # the resume tokenizes nothing
    assert _steps(tmp_path / "killed") == steps  # no step past the end
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "killed/run.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------- the adapter as its tensors say

def _plain_peft(tmp: Path, **config) -> tuple[Path, torch.nn.Module]:
    """A stock PEFT adapter on the built-in V3 (random, non-zero B), saved, and its merge_and_unload model."""
    from peft import LoraConfig, get_peft_model

    base = resolve_model_path("builtin:tiny-deepseek-v3")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**config))
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp / "plain")
    return tmp / "plain", model.merge_and_unload()


def test_a_stock_peft_adapter_with_patterns_merges_exactly_like_peft(tmp_path: Path) -> None:
    """rsLoRA, per-module rank and alpha patterns (two patterns match o_proj: PEFT takes the first)."""
    from dsft.export.merge import merge, resolve

    adapter, expected = _plain_peft(
        tmp_path, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_a_proj", "o_proj", "kv_b_proj"],
        rank_pattern={"o_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.o_proj": 3, "o_proj": 16})
    merge(resolve(adapter, resolve_model_path("builtin:tiny-deepseek-v3")), tmp_path / "merged", progress=False)
    merged = load_file(tmp_path / "merged/model.safetensors")
    state = expected.state_dict()  # transformers' fused experts aside, the keys are the checkpoint's
    shared = [k for k in state if k in merged]
    assert sum(k.endswith(("q_a_proj.weight", "o_proj.weight", "kv_b_proj.weight")) for k in shared) == 9
    for key in shared:
        assert torch.allclose(merged[key], state[key], rtol=0, atol=2e-7), key


def test_a_stock_peft_dora_adapter_is_refused_by_name(tmp_path: Path, cli) -> None:
    """DoRA's weight change is not W + s B A: dsft merged it silently wrong (0.044 off PEFT) before."""
    adapter, _ = _plain_peft(tmp_path, r=4, lora_alpha=8, use_dora=True, target_modules=["q_a_proj"])
    before = _snapshot(tmp_path)
    refused(cli("merge", "--adapter", adapter, "--base", resolve_model_path("builtin:tiny-deepseek-v3"), "--out",
                tmp_path / "merged"), "the adapter uses DoRA (use_dora: true)")
    assert _snapshot(tmp_path) == before


def test_the_reader_is_the_one_scale_rule(finished_run: Path) -> None:
    """The scales merge and export use are PEFT's: alpha / r of each module, from adapter_config.json."""
    from dsft.adapters.weights import read_adapter

    adapter = read_adapter(finished_run / "adapter")
    assert {s for _, _, s in adapter.linear.values()} == {2.0}
    assert adapter.experts["model.layers.1.mlp.experts"].scale == 2.0
    assert adapter.experts["model.layers.1.mlp.experts"].ids == [0, 3]


def test_load_lora_checks_the_adapter_before_peft(finished_run: Path, tmp_path: Path) -> None:
    """The loader eval, chat and dpo use refuses what merge refuses (expert ids beyond the model)."""
    from dsft.adapters.lora import load_lora
    from dsft.config.schema import ModelSection
    from dsft.errors import DsftError
    from dsft.models.load import load_model

    adapter = shutil.copytree(finished_run / "adapter", tmp_path / "adapter")
    meta = json.loads((adapter / "dsft_adapter.json").read_text())
    meta["routed_experts"]["experts"]["1"] = [0, 8]
    (adapter / "dsft_adapter.json").write_text(json.dumps(meta))
    base = load_model(ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32"), resolve_model_path("builtin:tiny-deepseek-v3"))
    with pytest.raises(DsftError, match="lists expert 8, but the base has 8 experts per layer"):
        load_lora(base, str(adapter))


# ---------------------------------------------------------------- identity

def test_the_weights_fingerprint_tells_a_copy_from_other_weights(tmp_path: Path) -> None:
    from dsft.models.identity import weights_fingerprint

    src = resolve_model_path("builtin:tiny-deepseek-v3")
    copy = shutil.copytree(src, tmp_path / "copy")
    assert weights_fingerprint(copy) == weights_fingerprint(src)
    tensors = load_file(copy / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.001
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert weights_fingerprint(copy) != weights_fingerprint(src)
    big = tmp_path / "big"  # over 1 MiB: header and sampled blocks
    big.mkdir()
    shutil.copy(src / "config.json", big / "config.json")
    save_file({"w": torch.zeros(1 << 20)}, big / "model.safetensors")
    first = weights_fingerprint(big)
    save_file({"w": torch.zeros(1 << 20).index_fill_(0, torch.tensor([0]), 1.0)}, big / "model.safetensors")
    assert weights_fingerprint(big) != first


def test_merge_with_force_takes_other_weights_and_says_nothing_silently(finished_run: Path, tmp_path: Path, cli) -> None:
    """Refused without --force (a row of the table); with it the merge runs on the given base."""
    from test_bad_inputs import other_weights

    run = run_copy(tmp_path, finished_run)
    other = other_weights(tmp_path)
    refused(cli("merge", "--adapter", run, "--base", other, "--out", tmp_path / "m"), "pass --force to apply the adapter")
    result = cli("merge", "--adapter", run, "--base", other, "--out", tmp_path / "m", "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m/dsft-merge.json").read_text())["base"] == str(other.resolve())


def test_runs_record_the_base_fingerprint(finished_run: Path) -> None:
    from dsft.models.identity import weights_fingerprint

    expected = weights_fingerprint(resolve_model_path("builtin:tiny-deepseek-v3"))
    assert json.loads((finished_run / "run.json").read_text())["base_model"]["weights_fingerprint"] == expected
    meta = json.loads((finished_run / "adapter/dsft_adapter.json").read_text())
    assert meta["base_model"]["weights_fingerprint"] == expected


# ---------------------------------------------------------------- writers through links

def test_export_and_merge_through_links_write_at_the_target(finished_run: Path, tmp_path: Path, cli) -> None:
    """A dangling link, a link to an empty directory, a link to an earlier output replaced with --force:
    written at the target, the link kept, nothing left in a hidden staging directory."""
    run = run_copy(tmp_path, finished_run)
    os.symlink(tmp_path / "exports/legal", tmp_path / "dangling")
    (tmp_path / "exports").mkdir()
    assert cli("export", "--adapter", run, "--out", tmp_path / "dangling").exit_code == 0
    assert (tmp_path / "dangling").is_symlink() and (tmp_path / "exports/legal/dsft-export.json").is_file()
    first = (tmp_path / "exports/legal/adapter_model.safetensors").read_bytes()
    refused(cli("export", "--adapter", run, "--out", tmp_path / "dangling"), "already exists; pass --force")
    again = cli("export", "--adapter", run, "--out", tmp_path / "dangling", "--force")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "dangling").is_symlink() and (tmp_path / "exports/legal/adapter_model.safetensors").read_bytes() == first
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "to-empty")
    merged = cli("merge", "--adapter", run, "--out", tmp_path / "to-empty")
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "to-empty").is_symlink() and (tmp_path / "empty/dsft-merge.json").is_file()
    assert not list(tmp_path.rglob("*.dsft-partial")) and not list(tmp_path.rglob("*.dsft-old-*"))


def test_a_user_file_added_to_an_export_stops_force(finished_run: Path, tmp_path: Path, cli) -> None:
    run = run_copy(tmp_path, finished_run)
    assert cli("export", "--adapter", run, "--out", tmp_path / "vllm").exit_code == 0
    (tmp_path / "vllm/serving-notes.md").write_text("mine")
    refused(cli("export", "--adapter", run, "--out", tmp_path / "vllm", "--force"), "holds files dsft did not write (serving-notes.md)")
    assert (tmp_path / "vllm/serving-notes.md").read_text() == "mine"


def test_a_failed_staged_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final rename fails: the old output is put back, no finished output hides in the staging directory."""
    from dsft import outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace

    def fail_into_out(src, dst):
        if Path(dst) == out and Path(src).name.endswith("dsft-partial"):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_into_out)
    with pytest.raises(OSError), outputs.staged(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"


# ---------------------------------------------------------------- tracker directories

def test_force_removes_what_the_trackers_wrote_and_nothing_else(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(training={"max_steps": 2, "report_to": ["tensorboard"]})
    assert cli("sft", "--recipe", recipe).exit_code == 0
    run = tmp_path / "run"
    events = sorted(p.name for p in (run / "tensorboard").rglob("events.out.tfevents.*"))
    written = json.loads((run / ".dsft-tracker-files.json").read_text())["files"]
    assert events and all(any(w.endswith(e) for w in written) for e in events)
    (run / "tensorboard/notes.txt").write_text("mine")
    refused(cli("sft", "--recipe", recipe, "--force"), "holds files dsft did not write (tensorboard/notes.txt)")
    (run / "tensorboard/notes.txt").unlink()
    assert cli("sft", "--recipe", recipe, "--force").exit_code == 0
    after = sorted(p.name for p in (run / "tensorboard").rglob("events.out.tfevents.*"))
    assert after and not set(after) & set(events)  # the first run's event files were replaced


def test_the_deleter_itself_keeps_an_unrecorded_file(tmp_path: Path) -> None:
    """Even past the checks, --force's deletion inside a tracker directory takes only recorded paths."""
    from dsft.runs import lifecycle, run_dir

    run = tmp_path / "run"
    (run / "tensorboard/sub").mkdir(parents=True)
    (run / "tensorboard/sub/events.out.tfevents.1").write_text("dsft")
    (run / "tensorboard/mine.txt").write_text("mine")
    (run / run_dir.TRACKER_FILES).write_text(json.dumps({"files": ["tensorboard/sub", "tensorboard/sub/events.out.tfevents.1"]}))
    lifecycle.create(run, force=True)
    assert [p.name for p in (run / "tensorboard").iterdir()] == ["mine.txt"]


# ---------------------------------------------------------------- convert: exactly the release's weight files

def _release(tmp: Path, legacy: bool = False) -> Path:
    src, dst = resolve_model_path("builtin:tiny-deepseek-llm"), tmp / "release"
    dst.mkdir()
    state = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    torch.save(state, dst / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


def test_convert_ignores_stray_weight_files_and_reads_legacy_pickles(tmp_path: Path, cli) -> None:
    """A stray model-00001-of-00002.safetensors beside the .bin used to be copied over the converted
    shard; training_args.bin was taken for a shard. A legacy (non-zip) torch.save file cannot be mmapped."""
    release = _release(tmp_path, legacy=True)
    save_file({"junk": torch.ones(3)}, release / "model-00001-of-00002.safetensors")
    torch.save({"lr": torch.tensor(1.0)}, release / "training_args.bin")
    result = cli("convert", "--model", release, "--out", tmp_path / "st")
    assert result.exit_code == 0, result.output
    assert "not copied" in result.output and "model-00001-of-00002.safetensors" in result.output
    out = tmp_path / "st"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    ids = torch.arange(3, 30).unsqueeze(0)
    ref = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-deepseek-llm"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits, ref(ids).logits)
    record = json.loads((out / "dsft-convert.json").read_text())
    assert record["converted"] == ["pytorch_model.bin"] and "training_args.bin" in record["not_copied"]


# ---------------------------------------------------------------- bounded inputs

def test_eval_cuts_rows_to_the_runs_max_length_and_says_so(finished_run: Path, tmp_path: Path, cli) -> None:
    run = run_copy(tmp_path, finished_run)
    long = {"messages": [{"role": "user", "content": "Why? " * 2000}, {"role": "assistant", "content": "Because. " * 2000}]}
    data = write_jsonl(tmp_path / "held.jsonl", [long, *legal_rows(2)])
    result = cli("eval", "--adapter", run, "--data", data, "--generations", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert report["truncated"] == 1 and report["max_length"] == 128
    assert "1 examples longer than the run's data.max_length (128 tokens) were cut" in result.output


def test_chat_refuses_binary_stdin_in_one_line(finished_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dsft.cli.app import app

    run = run_copy(tmp_path, finished_run)
    result = CliRunner().invoke(app, ["chat", "--adapter", str(run)], input=b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary\n")
    refused(result, "stdin: line 1 is not UTF-8 text")
    nul = CliRunner().invoke(app, ["chat", "--adapter", str(run)], input=b"hello\x00world\n")
    refused(nul, "stdin: line 1: holds NUL bytes")


def test_chat_keeps_the_conversation_within_the_runs_context(finished_run: Path, tmp_path: Path, cli) -> None:
    run = run_copy(tmp_path, finished_run)
    result = cli("chat", "--adapter", run, "--prompt", "Why? " * 500, "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert "the model sees its last 128, the run's data.max_length" in result.output


def test_a_tilde_in_a_recipe_is_the_home_directory(make_recipe, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `output_dir: ~/x` made a directory named `~` in the working directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    recipe = make_recipe(training={"max_steps": 1}, output_dir="~/runs/x")
    shutil.copy(tmp_path / "train.jsonl", home / "t.jsonl")
    data = yaml.safe_load(recipe.read_text())
    data["data"]["train"] = "~/t.jsonl"
    recipe.write_text(yaml.safe_dump(data))
    result = cli("sft", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    assert (home / "runs/x/adapter").is_dir() and not (tmp_path / "~").exists()
    assert yaml.safe_load((home / "runs/x/recipe.yaml").read_text())["data"]["train"] == [str(home / "t.jsonl")]


def test_yaml_merge_keys_and_scratch_anchors_work(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe()
    text = recipe.read_text().replace("training:\n", "training:\n  <<: *defaults\n")
    recipe.write_text("x-defaults: &defaults\n  weight_decay: 0.25\n  lr: 0.5\n" + text)
    result = cli("validate", recipe, "--set", "training.seed=3")
    assert result.exit_code == 0, result.output
    from dsft.config import load_recipe

    loaded = load_recipe(recipe)
    assert loaded.training.weight_decay == 0.25  # merged in
    assert loaded.training.lr == 1e-2  # the section's own key wins over the merged one, as YAML says
