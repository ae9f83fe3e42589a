"""Bad input, table-driven: one error line naming the file/line/key, exit code 2, nothing written.
Every row here is listed in docs/errors.md."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from conftest import REPO, legal_rows, write_jsonl
from test_bad_inputs import _snapshot, refused

GOOD_PAIR = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}


def _model_dir(tmp: Path, drop: str | None = None, config: dict | None = None) -> Path:
    from dsft.models.load import resolve_model_path

    src, dst = resolve_model_path("builtin:tiny-deepseek-v3"), tmp / "ckpt"
    shutil.copytree(src, dst)
    if drop:
        (dst / drop).unlink()
    if config is not None:
        (dst / "config.json").write_text(json.dumps({**json.loads((dst / "config.json").read_text()), **config}))
    return dst


def _sharded(tmp: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from dsft.models.load import resolve_model_path

    src, dst = resolve_model_path("builtin:tiny-deepseek-v3"), tmp / "ckpt"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, max_shard_size="200KB")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)
    (dst / "model-00002-of-00007.safetensors").unlink()
    return dst


def data(rows: list, name: str = "d.jsonl") -> Callable[[Path], dict]:
    return lambda tmp: {"data": {"train": str(write_jsonl(tmp / name, rows))}}


def csv(text: str) -> Callable[[Path], dict]:
    def make(tmp: Path) -> dict:
        (tmp / "d.csv").write_text(text)
        return {"data": {"train": str(tmp / "d.csv"), "format": "prompt_completion"}}
    return make


# (id, recipe changes (a dict, or a function of tmp_path returning one), command, expected text)
CASES: list[tuple[str, Any, str, str]] = [
    ("unknown-top-key", {"trainer": {}}, "validate", "trainer: unknown key; did you mean training?"),
    ("unknown-far-key", {"zzz": {}}, "validate", "zzz: unknown key; remove it (valid keys here: model, data"),
    ("unknown-nested-key", {"model": {"colour": "blue"}}, "validate", "model.colour: unknown key"),
    ("wrong-type", {"data": {"max_length": "lots"}}, "validate", "data.max_length: must be an integer"),
    ("negative-lr", {"training": {"lr": -1}}, "validate", "training.lr: must be > 0"),
    ("zero-batch", {"training": {"micro_batch_size": 0}}, "validate", "training.micro_batch_size: must be > 0"),
    ("missing-path", {"model": {"path": None}}, "validate", "model.path: required; add it"),
    ("bad-quantization", {"model": {"quantization": "int3"}}, "validate", "model.quantization: must be one of"),
    ("shard-experts-gone", {"model": {"quantization": "nf4", "shard_experts": True}}, "validate",
     "model.shard_experts: gone; each rank holds 1/N of the routed experts with training.parallel: {ep: N}"),
    ("unknown-builtin", {"model": {"path": "builtin:nope"}}, "validate", "model.path: unknown built-in model 'nope'"),
    ("bad-format", {"data": {"format": "openai-chat"}}, "validate", "data.format: must be one of"),
    ("routed-bad-form", {"adapter": {"routed_experts": "some"}}, "validate", "adapter.routed_experts.experts: must be none, all"),
    ("routed-empty-layer", {"adapter": {"routed_experts": {1: []}}}, "validate", "layer 1: give a non-empty list"),
    ("routed-dense-layer", {"adapter": {"routed_experts": {0: [1]}}}, "sft", "layer 0 has no routed experts"),
    ("routed-expert-range", {"adapter": {"routed_experts": {2: [8]}}}, "sft", "layer 2: expert ids go up to 7, got 8"),
    ("top-p-zero", {"adapter": {"routed_experts": {"policy": "gate_score", "top_p": 0}}}, "validate", "top_p: must be > 0"),
    ("top-p-above-one", {"adapter": {"routed_experts": {"policy": "gate_score", "top_p": 2}}}, "validate", "top_p: must be <= 1"),
    ("policy-and-experts", {"adapter": {"routed_experts": {"policy": "gate_score", "experts": "all"}}}, "validate",
     "give either experts or policy"),
    ("min-over-max", {"adapter": {"routed_experts": {"policy": "token_share", "min_per_layer": 3, "max_per_layer": 1}}},
     "validate", "max_per_layer (1) must be >= min_per_layer (3)"),
    ("min-over-experts", {"adapter": {"routed_experts": {"policy": "token_share", "min_per_layer": 9}}}, "sft",
     "adapter.routed_experts.min_per_layer: the model has 8 experts per layer"),
    ("all-groups-off", {"adapter": {"attention": False, "shared_experts": False, "dense_mlp": False}}, "validate",
     "enable at least one of"),
    ("balance-frozen-router", {"training": {"balance_loss": True}}, "validate", "training.balance_loss needs adapter.router: trainable"),
    ("eval-steps-no-eval", {"training": {"eval_steps": 5}}, "validate", "training.eval_steps needs data.eval"),
    ("parallel-experts-whole", {"adapter": {"routed_experts": {"experts": {1: [0]}, "mode": "full"}},
                                "training": {"parallel": {"ep": 2}}}, "validate",
     "training.parallel.ep: experts trained whole (adapter.routed_experts.mode: full) are not split"),
    ("parallel-ep-experts", {"training": {"parallel": {"ep": 3}}}, "validate --check-files",
     "training.parallel.ep: 3 does not divide the model's 8 routed experts per layer"),
    ("parallel-one-process", {"training": {"parallel": {"ep": 2}}}, "sft",
     "training.parallel: runs on several processes, a multiple of ep (2), this command has 1; launch it with --num-processes"),
    ("dpo-prompt-too-long", {"dpo": {"max_prompt_length": 500}}, "validate", "dpo.max_prompt_length (500) must be below data.max_length"),
    ("dpo-bad-loss", {"dpo": {"loss_type": "magic"}}, "validate", "dpo.loss_type: must be one of"),
    ("data-file-missing", {"data": {"train": "/nope/train.jsonl"}}, "sft", "data.train: file not found: /nope/train.jsonl"),
    ("bad-json-line", data([legal_rows(1)[0], "{oops"]), "sft", "d.jsonl:2: not valid JSON"),
    ("messages-missing-field", data([{"text": "hi"}]), "sft", "d.jsonl:1: missing field 'messages'"),
    ("messages-no-assistant", data([{"messages": [{"role": "user", "content": "hi"}]}]), "sft",
     "d.jsonl:1: no assistant message"),
    ("messages-bad-role", data([{"messages": [{"role": "robot", "content": "x"}]}]), "sft",
     "d.jsonl:1: messages[0] needs a role of system, user, assistant"),
    ("messages-empty-content", data([{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}]),
     "sft", "d.jsonl:1: messages[0] (user) has empty or non-string content"),
    ("empty-file", data([]), "sft", "d.jsonl:1: the file has no rows"),
    ("row-not-object", data(["[1, 2]"]), "sft", "d.jsonl:1: a row must be an object, got list"),
    ("prompt-completion-missing", lambda tmp: {**data([{"prompt": "Q?"}])(tmp), "data": {
        "train": str(write_jsonl(tmp / "d.jsonl", [{"prompt": "Q?"}])), "format": "prompt_completion"}}, "sft",
     "d.jsonl:1: missing field 'completion'"),
    ("alpaca-output-type", lambda tmp: {"data": {"train": str(write_jsonl(tmp / "d.jsonl", [
        {"instruction": "Do.", "output": 3}])), "format": "alpaca"}}, "sft", "d.jsonl:1: field 'output' must be a string"),
    ("csv-missing-column", csv("prompt\nWhat is a deed?\n"), "sft", "d.csv:1: the header has columns prompt; data.format prompt_completion needs prompt, completion (missing completion)"),
    ("unsupported-file-type", lambda tmp: {"data": {"train": str(write_jsonl(tmp / "d.txt", ["x"]))}}, "sft",
     "d.txt: unsupported file type '.txt'"),
    ("preference-under-sft", lambda tmp: {"data": {"train": str(write_jsonl(tmp / "p.jsonl", [GOOD_PAIR])),
                                                   "format": "preference"}}, "sft", "data.format: preference rows are for `dsft dpo`"),
    ("dpo-identical-pair", lambda tmp: {"data": {"train": str(write_jsonl(tmp / "p.jsonl", [
        {"prompt": "Q?", "chosen": "A.", "rejected": "A."}])), "format": "preference"}}, "dpo",
     "p.jsonl:1: chosen and rejected are identical"),
    ("dpo-missing-rejected", lambda tmp: {"data": {"train": str(write_jsonl(tmp / "p.jsonl", [
        {"prompt": "Q?", "chosen": "A."}])), "format": "preference"}}, "dpo", "p.jsonl:1: missing field 'rejected'"),
    ("dpo-needs-preference", {}, "dpo", "data.format: `dsft dpo` trains on preference rows"),
    ("dpo-init-adapter-missing", lambda tmp: {"data": {"train": str(write_jsonl(tmp / "p.jsonl", [GOOD_PAIR])),
                                                       "format": "preference"}, "dpo": {"init_adapter": str(tmp)}}, "dpo",
     "dpo.init_adapter:"),
    ("model-dir-missing", {"model": {"path": "/nope/model"}}, "sft", "model.path: model directory /nope/model does not exist"),
    ("model-no-config", lambda tmp: {"model": {"path": str(_model_dir(tmp, drop="config.json"))}}, "sft", "has no config.json"),
    ("model-no-weights", lambda tmp: {"model": {"path": str(_model_dir(tmp, drop="model.safetensors"))}}, "sft",
     "has no safetensors weights"),
    ("model-missing-shard", lambda tmp: {"model": {"path": str(_sharded(tmp))}}, "sft",
     "missing shards named by its index: model-00002-of-00007.safetensors"),
    ("model-no-tokenizer", lambda tmp: {"model": {"path": str(_model_dir(tmp, drop="tokenizer.json") and
                                                         _drop(tmp / "ckpt", "tokenizer_config.json"))}}, "sft", "has no tokenizer"),
    ("model-unsupported-type", lambda tmp: {"model": {"path": str(_model_dir(tmp, config={"model_type": "gpt_neox"}))}}, "sft",
     "model_type 'gpt_neox' is not supported"),
    ("output-dir-is-file", lambda tmp: {"output_dir": str(_touch(tmp / "afile"))}, "sft", "output_dir: "),
    ("output-dir-complete-run", lambda tmp: {"output_dir": str(_finished_run(tmp))}, "sft",
     "already holds a complete run; pass --force"),
    ("resume-nothing", {}, "sft --resume", "holds no dsft run to resume"),
]


def _drop(path: Path, name: str) -> Path:
    (path / name).unlink()
    return path


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


def _finished_run(tmp: Path) -> Path:
    run = tmp / "done"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "complete"}))
    return run


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.parametrize("case, changes, command, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: str, changes: Any, command: str, expected: str, tmp_path: Path, cli) -> None:
    from dsft.models.load import resolve_model_path

    from dsft.data.store import data_root

    resolve_model_path("builtin:tiny-deepseek-v3")  # the cache is materialised before the snapshot
    data_root()  # and its data/ directory (made by the first prepare of any run, whatever its order here)
    train = write_jsonl(tmp_path / "train.jsonl", legal_rows(4))
    recipe = {"model": {"path": "builtin:tiny-deepseek-v3", "dtype": "float32"},
              "data": {"train": str(train), "max_length": 128}, "training": {"max_steps": 1},
              "output_dir": str(tmp_path / "run")}
    if command == "dpo" and case != "dpo-needs-preference":
        recipe["data"]["max_length"] = 256
    recipe = _merge(recipe, changes(tmp_path) if callable(changes) else changes)
    if recipe["model"].get("path") is None:  # the case that leaves the key out
        recipe["model"].pop("path")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cache = Path(os.environ["DSFT_CACHE"])
    before = _snapshot(tmp_path, cache)
    args = command.split()
    result = cli(args[0], *([path] if args[0] == "validate" else ["--recipe", path]), *args[1:])
    refused(result, expected)
    assert _snapshot(tmp_path, cache) == before  # nothing created, nothing changed


def test_too_little_disk_for_checkpoints(make_recipe, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6, 1000))
    result = cli("sft", "--recipe", make_recipe())
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "needs about" in errors[0] and "KiB free" in errors[0]
    assert "has 1000 B;" in errors[0]  # sizes in the unit that fits, not "0.0 GiB"
    assert not (tmp_path / "run").exists()


def test_every_case_is_documented() -> None:
    text = (REPO / "docs/errors.md").read_text()
    missing = [case for case, *_ in CASES if f"`{case}`" not in text]
    assert not missing, f"docs/errors.md lacks {missing}"
    assert len(CASES) >= 30


def test_continuing_experts_trained_whole_under_expert_parallelism_is_refused(finished_run: Path, cli,
                                                                            tmp_path: Path) -> None:
    """An init_adapter that trains routed experts whole (mode: full) cannot be split over expert-parallel ranks yet:
    refused before any weight is read, naming the key, nothing written. (A subset of experts as LoRA is split:
    tests/test_distributed.py.)"""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "whole"  # the finished run's adapter, its expert LoRA made whole experts' weights
    shutil.copytree(finished_run / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    for key in [k for k in weights if ".experts.lora_gate_up_A." in k]:
        layer = key.split(".lora_gate_up_A.")[0]
        n, _, hidden = weights.pop(key).shape
        inter = weights.pop(f"{layer}.lora_down_A.weight").shape[2]
        del weights[f"{layer}.lora_gate_up_B.weight"], weights[f"{layer}.lora_down_B.weight"]
        weights[f"{layer}.lora_full_gate_up.weight"] = torch.zeros(n, 2 * inter, hidden)
        weights[f"{layer}.lora_full_down.weight"] = torch.zeros(n, hidden, inter)
    save_file(weights, adapter / "adapter_model.safetensors")
    meta = json.loads((adapter / "dsft_adapter.json").read_text())
    meta["routed_experts"] = {**(meta.get("routed_experts") or {"experts": {"1": [0]}}), "mode": "full"}
    (adapter / "dsft_adapter.json").write_text(json.dumps(meta))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PAIR] * 4)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": "builtin:tiny-deepseek-v3", "dtype": "float32"},
        "data": {"train": str(pairs), "format": "preference", "max_length": 128},
        "dpo": {"init_adapter": str(adapter), "max_prompt_length": 64},
        "training": {"max_steps": 1, "parallel": {"ep": 2}}, "output_dir": str(tmp_path / "run")}))
    result = cli("dpo", "--recipe", recipe)
    refused(result, f"dpo.init_adapter: {adapter} trains routed experts whole (mode: full)")
    assert not (tmp_path / "run").exists()
