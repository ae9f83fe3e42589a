"""Shared fixtures: a private model cache, tiny recipes, and a CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# `-n auto --dist loadfile`: a file's tests on one worker (its module fixtures built once); the tests that start
# several processes give them a free port (accelerate's --main_process_port 0, torchrun --standalone).
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, for them and their subprocesses
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _imports_out_of_gc() -> None:
    """In the process that runs the tests (not xdist's controller): the libraries they run, imported once and then
    left out of the garbage collector's full scans (gc.freeze). A full collection walks every tracked object, 0.36 s
    for these imports alone, and the Trainer runs one at the start of every training (accelerate's free_memory)."""
    import gc

    import peft  # noqa: F401
    import trl  # noqa: F401

    import dsft.train.pipeline  # noqa: F401

    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["DSFT_CACHE"] = str(tmp_path_factory.mktemp("dsft-cache"))


def fused_checkpoint(tmp: Path) -> Path:
    """The tiny V3 saved in transformers' fused expert layout (mlp.experts.gate_up_proj)."""
    import shutil

    from safetensors.torch import save_file

    from dsft.config.schema import ModelSection
    from dsft.models.load import load_model, resolve_model_path

    src, dst = resolve_model_path("builtin:tiny-deepseek-v3"), tmp / "fused"
    shutil.copytree(src, dst)
    base = load_model(ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32"), src)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def legal_rows(n: int) -> list[dict]:
    lines = (REPO / "data_templates/legal/train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def tiny_recipe(tmp_path: Path, name: str = "recipe.yaml", rows: int = 16, **sections) -> Path:
    """Write a small recipe for the tiny model under `tmp_path` (its data: `rows` legal conversations in
    tmp_path/train.jsonl); keyword sections update the defaults."""
    train = write_jsonl(tmp_path / "train.jsonl", legal_rows(rows))
    recipe = {
        "model": {"path": "builtin:tiny-deepseek-v3", "dtype": "float32"},
        "data": {"train": str(train), "format": "messages", "max_length": 128},
        "adapter": {"r": 8, "alpha": 16},
        "training": {"lr": 1e-2, "max_steps": 30, "micro_batch_size": 4, "scheduler": "constant",
                     "warmup_ratio": 0.0, "logging_steps": 5, "save_steps": 1000},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def make_recipe(tmp_path: Path):
    """tiny_recipe in the test's own tmp_path."""
    return lambda name="recipe.yaml", rows=16, **sections: tiny_recipe(tmp_path, name, rows, **sections)


@pytest.fixture
def cli():
    from typer.testing import CliRunner

    from dsft.cli.app import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny SFT run (2 steps) on the built-in DeepSeek-V3, with expert LoRA."""
    from typer.testing import CliRunner

    from dsft.cli.app import app

    root = tmp_path_factory.mktemp("finished")
    train = write_jsonl(root / "train.jsonl", legal_rows(8))
    recipe = {"model": {"path": "builtin:tiny-deepseek-v3", "dtype": "float32"},
              "data": {"train": str(train), "max_length": 128},
              "adapter": {"r": 4, "alpha": 8, "routed_experts": {1: [0, 3]}},
              "training": {"max_steps": 2, "micro_batch_size": 4, "save_steps": 1000, "logging_steps": 1},
              "output_dir": str(root / "run")}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["sft", "--recipe", str(root / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    return root / "run"


def released_v3(tmp_path: Path) -> Path:
    """The tiny V3 laid out as DeepSeek-V3 ships: bf16 storage, FP8 e4m3 projections with block scales
    and partial edge blocks, an MTP layer at index num_hidden_layers, vocab padded past the tokenizer,
    sharded with an index."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from dsft.models.fp8 import quantize
    from dsft.models.load import resolve_model_path

    src = resolve_model_path("builtin:tiny-deepseek-v3")
    dst = tmp_path / "v3"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    layers, block = config["num_hidden_layers"], 32
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, torch.zeros(64, t.shape[1])])  # vocab padded past the tokenizer's 1024
        if t.dim() == 2 and key.endswith(("proj.weight", "proj_with_mqa.weight")):
            out[key], out[key + "_scale_inv"] = quantize(t, (block, block))  # kv_a_proj_with_mqa: 40 rows, a partial tile
        else:
            out[key] = t.to(torch.bfloat16)
        if key.startswith(f"model.layers.{layers - 1}."):  # DeepSeek-V3's MTP layer, after the last
            for k in (key, key + "_scale_inv"):
                if k in out:
                    out[k.replace(f"layers.{layers - 1}.", f"layers.{layers}.")] = out[k].clone()
    out[f"model.layers.{layers}.eh_proj.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)
    weights = sorted(k for k in out if not k.endswith("_scale_inv"))  # a scale in its weight's shard, as released
    shards = {f"model-0000{i + 1}-of-00002.safetensors": [k for w in weights[i::2] for k in (w, w + "_scale_inv") if k in out]
              for i in range(2)}
    for shard, keys in shards.items():
        save_file({k: out[k] for k in keys}, dst / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.update(vocab_size=1088, torch_dtype="bfloat16", num_nextn_predict_layers=1,
                  quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block],
                                       "activation_scheme": "dynamic"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def resume_at_every_checkpoint(cli, command: str, recipe: Path, whole: Path, root: Path) -> None:
    """`dsft COMMAND --recipe RECIPE` (output_dir WHOLE, a constant learning rate, checkpoints kept) trained
    in-process; then, for each of its checkpoints, the very last included, a copy of the run cut back to it (the
    later checkpoints and the adapter gone, run.json `running` as a kill leaves it) and continued with --resume:
    every continued run ends with the uninterrupted run's adapter and logged losses."""
    import shutil

    import torch
    from safetensors.torch import load_file

    result = cli(command, "--recipe", recipe)
    assert result.exit_code == 0, result.output
    expected = load_file(whole / "adapter/adapter_model.safetensors")
    losses = _logged(whole, "loss")
    checkpoints = sorted((whole / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) >= 2, checkpoints
    for checkpoint in checkpoints:
        step = int(checkpoint.name.split("-")[1])
        cut = root / f"cut-{step}"
        shutil.copytree(whole, cut)
        shutil.rmtree(cut / "adapter")
        for later in (cut / "checkpoints").glob("checkpoint-*"):
            if int(later.name.split("-")[1]) > step:
                shutil.rmtree(later)
        info = json.loads((cut / "run.json").read_text())
        (cut / "run.json").write_text(json.dumps({**info, "status": "running"}))
        data = yaml.safe_load((cut / "recipe.yaml").read_text())
        (cut / "recipe.yaml").write_text(yaml.safe_dump({**data, "output_dir": str(cut)}, sort_keys=False))
        again = root / f"cut-{step}.yaml"
        again.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "output_dir": str(cut)}))
        resumed = cli(command, "--recipe", again, "--resume")
        assert resumed.exit_code == 0, resumed.output
        got = load_file(cut / "adapter/adapter_model.safetensors")
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{checkpoint.name}: {key}")
        assert _logged(cut, "loss") == pytest.approx(losses, rel=1e-4, abs=1e-6), checkpoint.name


def _logged(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r and "eval_loss" not in r}

