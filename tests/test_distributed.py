"""Two processes (DDP over gloo on CPU) give the single-process result at the same global batch, and
only the main rank writes the run: through the shipped multi-node accelerate config (recipes/accelerate/multinode-ddp.yaml, shrunk to one machine) with the
NF4 expert codes sharded across the ranks (`model.shard_experts`); under FSDP2 (recipes/accelerate/fsdp2.yaml) the
adapter equals one process's and resumes; dsft's NF4 expert storage shards across ranks, by FSDP2 or by dsft's
loader, and matches one unsharded process (tests/fsdp_worker.py, run in the FSDP2 launch's processes)."""

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


NF4_ALL = {"adapter": {"routed_experts": "all"}, "model": {"quantization": "nf4"}}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The adapter of an NF4 SFT run with LoRA on every routed expert, 4 steps of 4 rows, in one process (in-process):
    what the two-process layouts below must train at the same global batch."""
    from typer.testing import CliRunner

    from conftest import tiny_recipe
    from dsft.cli.app import app

    tmp = tmp_path_factory.mktemp("one")
    recipe = tiny_recipe(tmp, rows=16, output_dir=str(tmp / "one"), **NF4_ALL,
                         training={"max_steps": 4, "micro_batch_size": 4, "lr": 1e-2})
    result = CliRunner().invoke(app, ["sft", "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    return load_file(tmp / "one/adapter/adapter_model.safetensors")


def test_two_processes_match_one(one_process: dict, make_recipe, tmp_path: Path) -> None:
    """SFT under DDP once (the other objectives' two-process tests go through `--num-processes`): NF4 codes sharded,
    launched by the shipped multi-node config."""
    two = make_recipe("two.yaml", rows=16, output_dir=str(tmp_path / "two"), adapter=NF4_ALL["adapter"],
                      model={"quantization": "nf4", "shard_experts": True},
                      training={"max_steps": 4, "micro_batch_size": 2, "lr": 1e-2})
    cache = tmp_path / "cache-two"  # the two processes prepare their data afresh (the built-in model: the session's)
    cache.mkdir()
    os.symlink(Path(os.environ["DSFT_CACHE"]) / "builtin", cache / "builtin")
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
    double = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    assert one_process.keys() == double.keys() and any("experts.lora_" in k for k in double)
    assert_same_training(double, one_process)


def test_expert_parallel_sft_as_a_user_types_it_matches_one_process(one_process: dict, make_recipe, cli,
                                                                    tmp_path: Path) -> None:
    """`dsft sft --num-processes 2 --set training.parallel.ep=2` (docs/multi-gpu.md): NF4 experts and expert LoRA on
    every routed expert split over the two ranks (transformers' all-to-all dispatch, FSDP2 for the rest); the adapter
    and its checkpoints are whole, and equal to one process's at the same global batch; run.json says how the codes
    were held; after losing everything past the first checkpoint, `--resume` (the sharded optimizer state read back
    through torch.distributed.checkpoint) ends at the uninterrupted run's adapter exactly."""
    two = make_recipe("two.yaml", rows=16, output_dir=str(tmp_path / "two"), **NF4_ALL,
                      training={"max_steps": 4, "micro_batch_size": 2, "lr": 1e-2, "save_steps": 2})
    done = subprocess.run([sys.executable, "-m", "dsft", "sft", "--recipe", str(two), "--num-processes", "2",
                           "--set", "training.parallel.ep=2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("dsft sft:") == 1  # one summary: the main rank's
    info = json.loads((tmp_path / "two/run.json").read_text())
    assert info["status"] == "complete" and info["summary"]["processes"] == 2
    assert info["summary"]["expert_codes"] == "expert-parallel over 2"
    double = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    assert one_process.keys() == double.keys() and any("experts.lora_" in k for k in double)
    assert all(double[k].shape == one_process[k].shape for k in double)  # gathered whole: every expert's LoRA
    assert_same_training(double, one_process)
    last = load_file(tmp_path / "two/checkpoints/checkpoint-4/adapter_model.safetensors")
    assert all(torch.equal(last[k], double[k]) for k in double)
    # as if killed after the first checkpoint: --resume reads the sharded optimizer state back (one file per rank)
    assert sorted(p.name for p in (tmp_path / "two/checkpoints/checkpoint-2/optimizer_dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    marked = json.loads((tmp_path / "two/checkpoints/checkpoint-2/dsft-complete.json").read_text())["files"]
    assert {"rng_state_1.pth", "optimizer_dcp/__1_0.distcp"} <= set(marked)  # rank 1's files, sized once written
    shutil.rmtree(tmp_path / "two/checkpoints/checkpoint-4")
    shutil.rmtree(tmp_path / "two/adapter")
    (tmp_path / "two/run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    done = subprocess.run([sys.executable, "-m", "dsft", "sft", "--recipe", str(two), "--num-processes", "2",
                           "--set", "training.parallel.ep=2", "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.loads((tmp_path / "two/run.json").read_text())
    assert info["status"] == "complete" and info["resumed_from"] == str(tmp_path / "two/checkpoints/checkpoint-2")
    resumed = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    assert all(torch.equal(resumed[k], double[k]) for k in double)  # the uninterrupted run's adapter, exactly


FSDP = ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/fsdp2.yaml"),
        "--num_processes", "2", "--main_process_port", "0", str(Path(__file__).with_name("fsdp_launch.py")), "sft"]


def _launch(*args: str, env: dict | None = None) -> None:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An NF4 SFT run in one process (in-process) and through the shipped recipes/accelerate/fsdp2.yaml on 2 CPU
    processes, whose ranks then lose everything past the first checkpoint and `--resume` (the uninterrupted adapter
    kept as two.uninterrupted), then run tests/fsdp_worker.py's sharding cases (their report)."""
    from typer.testing import CliRunner

    from conftest import fused_checkpoint, tiny_recipe
    from dsft.cli.app import app

    tmp = tmp_path_factory.mktemp("fsdp2")
    recipes = {name: tiny_recipe(tmp, f"{name}.yaml", rows=16, output_dir=str(tmp / name), model={"quantization": "nf4"},
                                 adapter={"routed_experts": {1: [0, 3]}},
                                 training={"max_steps": 4, "micro_batch_size": micro, "lr": 1e-2, "save_steps": 2})
               for name, micro in (("one", 4), ("two", 2))}
    one = CliRunner().invoke(app, ["sft", "--recipe", str(recipes["one"])])  # one process: in-process
    assert one.exit_code == 0, one.output
    report = tmp / "sharding.json"
    _launch(*FSDP, "--recipe", str(recipes["two"]),
            env={"DSFT_TEST_RESUME": str(tmp / "two"),
                 "DSFT_TEST_SHARDING": os.pathsep.join([str(report), str(fused_checkpoint(tmp))])})
    return {"tmp": tmp, "sharding": json.loads(report.read_text())}


def test_fsdp2_matches_one_process_and_resumes(fsdp2_run: dict) -> None:
    """The shipped recipes/accelerate/fsdp2.yaml on 2 CPU processes (tests/fsdp_launch.py keeps
    accelerate's FSDP plugin on without GPUs): NF4 codes and the adapter sharded by FSDP2, the adapter
    gathered for saving equals one process's; after losing everything past the first checkpoint,
    `--resume` reloads the sharded adapter and optimizer and ends where the uninterrupted run did."""
    tmp = fsdp2_run["tmp"]
    single = load_file(tmp / "one/adapter/adapter_model.safetensors")
    sharded = load_file(tmp / "two.uninterrupted/adapter_model.safetensors")
    assert single.keys() == sharded.keys() and any("experts.lora_" in k for k in single)
    assert_same_training(sharded, single)

    info = json.loads((tmp / "two/run.json").read_text())
    assert info["status"] == "complete" and info["summary"]["processes"] == 2
    assert info["resumed_from"] == str(tmp / "two/checkpoints/checkpoint-2")
    assert sorted(p.name for p in (tmp / "two/checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    resumed = load_file(tmp / "two/adapter/adapter_model.safetensors")
    for key in sharded:
        torch.testing.assert_close(resumed[key], sharded[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,layout", [("fsdp2", "per-expert"), ("codes", "per-expert"), ("codes", "fused")])
def test_sharded_nf4_experts_match_one_process(mode: str, layout: str, fsdp2_run: dict) -> None:
    """One step of the NF4 tiny model with LoRA on attention, shared and every routed expert, on two ranks, against
    one unsharded process (tests/fsdp_worker.py). `fsdp2`: FSDP2 shards the codes (a frozen parameter); `codes`:
    `model.shard_experts` has each rank read and quantize only its half of every layer's experts (from DeepSeek's
    per-expert layout or transformers' fused one) and gather the layer's codes when it runs (forward and
    backward)."""
    report = fsdp2_run["sharding"][f"{mode}-{layout}"]
    assert report["packed_sharded"] and report["packed_local_fraction"] == 0.5  # each rank holds half the codes
    assert report["logits_max_diff"] < 1e-4
    if mode == "codes":  # quantized in halves, bit-identical to quantizing each layer whole
        assert report["logits_max_diff"] == 0.0
    assert report["missing"] == [] and report["expert_lora_params"] > 0
    assert report["param_max_diff"] < 1e-4  # after one AdamW step, gathered adapter == unsharded run's


@pytest.mark.parametrize("case", ["ep-fp32", "ep-nf4-one-rank"])
def test_expert_parallel_experts_match_one_process(case: str, fsdp2_run: dict) -> None:
    """dsft's experts under expert parallelism on transformers' engine (dsft.moe.parallel: all-to-all token dispatch,
    FSDP2 over fsdp 2 x ep 2), LoRA on every routed expert, against one unsharded process at the same global batch
    (tests/fsdp_worker.py ep_case): each rank holds half of every expert tensor (codes, scales, LoRA) and runs 4 of
    the 8 experts on local ids; logits, gradients (read from the local tensors in backward too) and the adapter after
    one AdamW step are the one process's; the NF4 codes are the bytes one process quantized. `one-rank` (NF4): every
    token routed to rank 0's experts, so rank 1's experts send and receive nothing, and it still trains. (NF4 with
    tokens on every expert: the `dsft sft` test above.)"""
    report = fsdp2_run["sharding"][case]
    assert report["local_fraction"] == 0.5 and report["local_experts"] == [4]
    assert report["unsharded_trainable"] == []  # every trainable tensor of an EP module is a sharded tensor
    assert report["logits_max_diff"] < 1e-5
    assert report["grad_max_rel"] < 1e-5
    assert report["param_max_diff"] < 1e-4  # AdamW's first step moves every element by about lr (1e-2) whatever its size
    assert report["codes_equal_one_process"] and report["expert_lora_params"] > 0
    # which experts' LoRA got a gradient: with every token on rank 0's experts, none of rank 1's
    assert report["experts_with_grad"] == ([0, 1, 2, 3] if case.endswith("one-rank") else list(range(8)))


def test_nf4_codes_are_a_frozen_parameter() -> None:
    """A parameter, so FSDP2 shards them and torch.distributed.checkpoint finds every parameter in the
    state dict; frozen, so adapter files and the Trainer's adapter-only FSDP checkpoints leave them out.
    Not a buffer: DDP broadcasts every buffer from rank 0 before each forward."""
    from dsft.config.schema import ModelSection
    from dsft.models.load import load_model, resolve_model_path
    from dsft.moe.experts import DsftExperts

    section = ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32", quantization="nf4")
    model = load_model(section, resolve_model_path(section.path))
    experts = next(m for m in model.modules() if isinstance(m, DsftExperts))
    assert sum(b.numel() for b in model.buffers()) < 100  # rotary tables and correction biases only
    codes = experts.gate_up_nf4.codes
    assert isinstance(codes, torch.nn.Parameter) and codes.dtype == torch.uint8 and not codes.requires_grad
    state = experts.state_dict()
    assert torch.equal(state["gate_up_nf4.codes"], codes)
    before = experts.gate_up_nf4.dequantize().clone()
    experts.load_state_dict(state, strict=True)
    assert torch.equal(experts.gate_up_nf4.dequantize(), before)
