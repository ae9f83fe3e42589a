"""Several processes (over gloo on CPU) give the single-process result at the same global batch, and only the main
rank writes the run. One launch of the shipped multi-node accelerate config (recipes/accelerate/multinode-ddp.yaml,
shrunk to one machine) runs every multi-process command in its process group (tests/launch.py): SFT under DDP; SimPO
(with a routing policy), GRPO, KTO, DPO and SFT under FSDP2 + expert parallelism (`training.parallel.ep=2`, the SFT
run resumed twice); SFT under FSDP2 alone (`ep=1`); then tests/fsdp_worker.py's cases: dsft's experts split by
expert parallelism match one unsharded process."""

from __future__ import annotations

import json
import math
import os
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


CONSTANT = {"scheduler": "constant", "warmup_ratio": 0.0}  # so an extra step after a resume would show
NF4_ALL = {"adapter": {"routed_experts": "all"}, "model": {"quantization": "nf4"}}
# LoRA on the experts the data is routed to (layer 1: 0, 2, 3; layer 2: 1, 3, 7): a subset that sits unevenly over
# two expert-parallel ranks, layer 1's all on rank 0
SIMPO = {"adapter": {"routed_experts": {"policy": "token_share", "top_p": 0.5, "samples": 64}},
         "simpo": {"max_prompt_length": 64},
         "data": {"train": str(REPO / "data_templates/legal/preference.jsonl"), "format": "preference", "max_length": 160}}
def dpo_sections(init: Path) -> dict:
    """DPO continuing `init`'s adapter (TRL's frozen "ref" copy of it is the reference) on the NF4 base."""
    return {"model": {"quantization": "nf4"}, "dpo": {"init_adapter": str(init), "max_prompt_length": 64, "beta": 0.1},
            "data": {"train": str(REPO / "data_templates/legal/preference.jsonl"), "format": "preference",
                     "max_length": 160}}


SIMPO_TRAINING = {"lr": 5e-3, "scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 1, "max_steps": 3}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The adapter of an NF4 SFT run with LoRA on every routed expert, 4 steps of 4 rows, in one process (in-process):
    what the two-process layouts below must train at the same global batch."""
    from typer.testing import CliRunner

    from conftest import tiny_recipe
    from dsft.cli.app import app

    tmp = tmp_path_factory.mktemp("one")
    recipe = tiny_recipe(tmp, rows=16, output_dir=str(tmp / "one"), **NF4_ALL,
                         training={"max_steps": 4, "micro_batch_size": 4, "lr": 1e-2, **CONSTANT})
    result = CliRunner().invoke(app, ["sft", "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    return load_file(tmp / "one/adapter/adapter_model.safetensors")


@pytest.fixture(scope="module")
def ddp_launch(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One launch of the shipped multi-node config (shrunk to one machine, 2 processes, a fresh data cache) running,
    in its process group (tests/launch.py): NF4 SFT under DDP; with `training.parallel.ep=2` SimPO with a policy,
    GRPO, KTO, and DPO continuing the SimPO run's adapter; NF4 SFT under FSDP2 alone (`ep=1`); then NF4 SFT with
    `training.parallel.ep=2`, which loses everything past its first checkpoint and resumes, then loses its adapter
    and resumes from its last checkpoint."""
    from conftest import fused_checkpoint, tiny_recipe
    from test_grpo import grpo_recipe

    tmp = tmp_path_factory.mktemp("ddp")
    training = {"max_steps": 4, "micro_batch_size": 2, "lr": 1e-2, "save_steps": 2, **CONSTANT}
    unsaved = {**training, "save_steps": 100}  # the runs that are not resumed write no checkpoint
    ddp = tiny_recipe(tmp, "ddp.yaml", rows=16, output_dir=str(tmp / "ddp"), **NF4_ALL, training=unsaved)
    split = tiny_recipe(tmp, "split.yaml", rows=16, output_dir=str(tmp / "split"), **NF4_ALL, training=training)
    simpo = tiny_recipe(tmp, "simpo.yaml", output_dir=str(tmp / "simpo"), **SIMPO, training={**SIMPO_TRAINING,
                                                                                           "micro_batch_size": 2})
    dpo = tiny_recipe(tmp, "dpo.yaml", output_dir=str(tmp / "dpo"), **dpo_sections(tmp / "simpo"),
                      training={**SIMPO_TRAINING, "micro_batch_size": 2})
    grpo = grpo_recipe(tmp, training={"max_steps": 2, "micro_batch_size": 4, "save_steps": 100},
                       grpo={"max_completion_length": 8})
    kto = tiny_recipe(tmp, "kto.yaml", output_dir=str(tmp / "kto"), kto={"max_prompt_length": 64},
                      adapter={"routed_experts": {1: [0, 3, 6], 2: [2]}},
                      data=SIMPO["data"], training={**SIMPO_TRAINING, "max_steps": 1, "micro_batch_size": 2})
    fsdp = tiny_recipe(tmp, "fsdp.yaml", rows=16, output_dir=str(tmp / "fsdp"), **NF4_ALL, training=unsaved)
    report = tmp / "sharding.json"
    cache = tmp / "cache"  # the processes prepare their data afresh (the built-in model: the session's)
    cache.mkdir()
    os.symlink(Path(os.environ["DSFT_CACHE"]) / "builtin", cache / "builtin")
    done = subprocess.run([sys.executable, *MULTINODE, str(Path(__file__).with_name("launch.py")), "sft",
                           "--recipe", str(ddp)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DSFT_CACHE": str(cache), "DSFT_TEST_RESUME": str(tmp / "split"),
                               "DSFT_TEST_SHARDING": os.pathsep.join([str(report), str(fused_checkpoint(tmp))]),
                               "DSFT_TEST_THEN": json.dumps([["simpo", "--recipe", str(simpo), "--set",
                                                              "training.parallel.ep=2"],
                                                             ["grpo", "--recipe", str(grpo), "--set",
                                                              "training.parallel.ep=2"],
                                                             ["kto", "--recipe", str(kto), "--set",
                                                              "training.parallel.ep=2"],
                                                             ["sft", "--recipe", str(fsdp), "--set",
                                                              "training.parallel.ep=1"],
                                                             ["dpo", "--recipe", str(dpo), "--set",
                                                              "training.parallel.ep=2"],
                                                             ["sft", "--recipe", str(split), "--set",
                                                              "training.parallel.ep=2"]])})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sharding = {**json.loads(report.read_text()), **json.loads(report.with_name(report.name + ".rank1").read_text())}
    return {"tmp": tmp, "printed": done.stdout, "sharding": sharding}


def test_two_processes_match_one(one_process: dict, ddp_launch: dict) -> None:
    """NF4 SFT under DDP (no training.parallel: a whole model per process), launched by the shipped multi-node
    config, equals one process at the same global batch."""
    tmp, printed = ddp_launch["tmp"], ddp_launch["printed"]
    assert printed.count("dsft sft:") == 5  # one summary a command (the main rank's), and the two resumes
    assert printed.count("dsft simpo:") == printed.count("dsft dpo:") == printed.count("dsft grpo:") == 1
    assert printed.count("dsft kto:") == 1
    # the data is tokenized once: by one rank, the other waits for it and maps the same entry, and so do both ranks
    # of the next command and of its resume
    assert printed.count("data.train: tokenized 16 rows") == 1, printed
    assert printed.count("data.train: tokens from cache (16 rows") == 9, printed
    info = json.loads((tmp / "ddp/run.json").read_text())
    assert info["status"] == "complete" and info["summary"]["processes"] == 2
    assert info["summary"]["expert_codes"] == "whole"
    double = load_file(tmp / "ddp/adapter/adapter_model.safetensors")
    assert one_process.keys() == double.keys() and any("experts.lora_" in k for k in double)
    assert_same_training(double, one_process)


def test_simpo_under_expert_parallelism_with_a_policy_matches_one_process(ddp_launch: dict, cli,
                                                                         tmp_path: Path) -> None:
    """`dsft simpo --set training.parallel.ep=2` with a routing policy (in the shared launch), against one process
    here at the same global batch: each rank holds only its experts, the routing is profiled with the tokens
    dispatched to them (half the sampled rows on each rank, the counts summed: those of one process profiling them
    all, so both choose the same experts), the chosen subset's LoRA sits in padded slots, and the older pair
    trainers' NLL term is rescaled across processes (SimPO's, which ORPO shares: dsft's own code path)."""
    from conftest import tiny_recipe

    one = tiny_recipe(tmp_path, "simpo.yaml", output_dir=str(tmp_path / "one"), **SIMPO,
                      training={**SIMPO_TRAINING, "micro_batch_size": 4})
    assert cli("simpo", "--recipe", one).exit_code == 0
    run = ddp_launch["tmp"] / "simpo"
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["expert_codes"] == "expert-parallel over 2"
    # the routing profile behind its policy: each rank profiled half the sampled rows, their counts summed, which
    # are the counts of one process profiling them all (so both choose the same experts)
    two, one_profile = (json.loads((r / "routing/profile.json").read_text()) for r in (run, tmp_path / "one"))
    assert two["rows"] == one_profile["rows"] == 64 and two["tokens_counted"] == one_profile["tokens_counted"]
    assert {k: v["counts"] for k, v in two["layers"].items()} == {k: v["counts"] for k, v in one_profile["layers"].items()}
    assert_same_training(load_file(run / "adapter/adapter_model.safetensors"),
                         load_file(tmp_path / "one/adapter/adapter_model.safetensors"))


def test_dpo_with_its_reference_under_expert_parallelism_matches_one_process(ddp_launch: dict, cli,
                                                                             tmp_path: Path) -> None:
    """`dsft dpo --set training.parallel.ep=2` continuing the SimPO run's adapter (in the shared launch), whose expert
    LoRA is on a subset of each layer's experts that sits unevenly across the two ranks (layer 1: experts 0, 2, 3 on
    rank 0, only padding on rank 1; layer 2: 1, 3 on rank 0 and 7 on rank 1): it is split into padded slots, and
    TRL's frozen "ref" copy, made once the trainer is built, likewise; the saved adapter has the one-process layout
    and equals one process's at the same global batch (here, continuing the same adapter)."""
    from conftest import tiny_recipe

    init = ddp_launch["tmp"] / "simpo"
    one = tiny_recipe(tmp_path, "dpo.yaml", output_dir=str(tmp_path / "one"), **dpo_sections(init),
                      training={**SIMPO_TRAINING, "micro_batch_size": 4})
    assert cli("dpo", "--recipe", one).exit_code == 0
    run = ddp_launch["tmp"] / "dpo"
    info = json.loads((run / "run.json").read_text())
    assert info["summary"]["processes"] == 2 and info["summary"]["expert_codes"] == "expert-parallel over 2"
    double = load_file(run / "adapter/adapter_model.safetensors")
    single = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    assert double.keys() == single.keys() and any("experts.lora_" in k for k in double)
    assert {k: v.shape for k, v in double.items()} == {k: v.shape for k, v in single.items()}  # no padding saved
    assert {v.shape[0] for k, v in double.items() if "experts.lora_" in k} == {3}  # its experts, per layer
    assert json.loads((run / "adapter/dsft_adapter.json").read_text())["routed_experts"]["experts"] == {
        "1": [0, 2, 3], "2": [1, 3, 7]}
    assert_same_training(double, single)


@pytest.mark.parametrize("objective", ["grpo", "kto"])
def test_grpo_and_kto_train_under_expert_parallelism(objective: str, ddp_launch: dict) -> None:
    """`dsft grpo` and `dsft kto` with `--set training.parallel.ep=2` (in the shared launch). GRPO generates on the
    split model (its rewards checked on a group first, once the model is split; the root's weights gathered around
    generation; every rank stepping until all are done) and trains on each rank's prompts; KTO with its KL
    completions. Each writes one adapter, whole (not compared with one process: GRPO samples its completions, and
    KTO's KL completions are the micro-batch's rows rolled by one, so they differ with the micro-batch)."""
    run = ddp_launch["tmp"] / ("run" if objective == "grpo" else "kto")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["summary"]["processes"] == 2
    assert info["summary"]["expert_codes"] == "expert-parallel over 2"
    assert list(run.glob("adapter*")) == [run / "adapter"]
    adapter = load_file(run / "adapter/adapter_model.safetensors")
    metadata = json.loads((run / "adapter/dsft_adapter.json").read_text())["routed_experts"]["experts"]
    assert {v.shape[0] for k, v in adapter.items() if "experts.lora_" in k} == {len(ids) for ids in metadata.values()}
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_num_processes_runs_the_same_command_under_accelerate(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--num-processes N` re-runs the command line without it under `accelerate launch --multi_gpu` on N processes
    (ranks over gloo without CUDA, meeting on a free port), and exits with its code; the multi-process tests above
    start their processes with accelerate launch directly."""
    from dsft.cli import _common

    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 3)
    monkeypatch.setattr(sys, "argv", ["dsft", "sft", "--recipe", "r.yaml", "--num-processes", "2", "--set", "a=1"])
    monkeypatch.delenv("RANK", raising=False)
    import typer

    with pytest.raises(typer.Exit) as stop:
        _common.relaunch(2)
    assert stop.value.exit_code == 3
    (argv,) = calls
    assert argv[argv.index("--num_processes") + 1] == "2" and "--multi_gpu" in argv
    assert argv[argv.index("--main_process_port") + 1] == "0"
    assert argv[-7:] == ["-m", "dsft", "sft", "--recipe", "r.yaml", "--set", "a=1"]
    monkeypatch.setenv("RANK", "0")
    assert _common.relaunch(2) is None and len(calls) == 1  # inside a launched rank: nothing to relaunch


def test_expert_parallel_sft_matches_one_process_and_resumes(one_process: dict, ddp_launch: dict) -> None:
    """`dsft sft --set training.parallel.ep=2` on 2 processes (docs/multi-gpu.md): NF4 experts and expert LoRA on
    every routed expert split over the two ranks (transformers' all-to-all dispatch, FSDP2 for the rest); the adapter
    and its checkpoints are whole, and equal to one process's at the same global batch; run.json says how the codes
    were held; after losing everything past the first checkpoint, `--resume` (the sharded optimizer state read back
    through torch.distributed.checkpoint) ends at the uninterrupted run's adapter exactly; and killed after its last
    checkpoint (the adapter not yet written), `--resume` writes that adapter, with no step more (a constant lr)."""
    run = ddp_launch["tmp"] / "split"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["summary"]["processes"] == 2
    assert info["summary"]["expert_codes"] == "expert-parallel over 2"
    assert info["resumed_from"] == str(run / "checkpoints/checkpoint-4")  # the second resume's
    printed = " ".join(ddp_launch["printed"].split())
    assert f"resuming {run} from checkpoint-2: step 2 of 4" in printed
    assert f"resuming {run} from checkpoint-4: step 4 of 4" in printed
    uninterrupted = load_file(run.with_name("split.uninterrupted") / "adapter_model.safetensors")
    assert one_process.keys() == uninterrupted.keys() and any("experts.lora_" in k for k in uninterrupted)
    assert all(uninterrupted[k].shape == one_process[k].shape for k in uninterrupted)  # gathered whole
    assert_same_training(uninterrupted, one_process)
    checkpoint = run / "checkpoints/checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "optimizer_dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    marked = json.loads((checkpoint / "dsft-complete.json").read_text())["files"]
    assert {"rng_state_1.pth", "optimizer_dcp/__1_0.distcp"} <= set(marked)  # rank 1's files, sized once written
    # checkpoint-4, written by the first resume, is the uninterrupted run's last step; the second resume, from it,
    # writes it as the adapter with no step more (an extra step at lr 1e-2 would move it)
    last = load_file(run / "checkpoints/checkpoint-4/adapter_model.safetensors")
    resumed = load_file(run / "adapter/adapter_model.safetensors")
    assert all(torch.equal(last[k], uninterrupted[k]) and torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_fsdp2_alone_on_the_engine_matches_one_process(one_process: dict, ddp_launch: dict) -> None:
    """`training.parallel.ep=1` (in the shared launch): FSDP2 over the two processes on transformers' engine, no
    expert split (the NF4 codes and the adapter sharded by FSDP2, gathered for saving); the adapter equals one
    process's at the same global batch. (Its resume is expert parallelism's, tested above: the same checkpoints.)"""
    run = ddp_launch["tmp"] / "fsdp"
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["expert_codes"] == "fsdp2"
    sharded = load_file(run / "adapter/adapter_model.safetensors")
    assert one_process.keys() == sharded.keys()
    assert_same_training(sharded, one_process)


def test_accelerates_fsdp_plugin_is_refused_with_the_layout_to_use(make_recipe, cli,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An `accelerate launch --config_file` with FSDP (recipes/accelerate/fsdp2.yaml, gone) would have accelerate
    shard the model a second way: refused before anything is read, naming training.parallel."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    result = cli("sft", "--recipe", make_recipe())
    assert result.exit_code == 2 and "training.parallel: {ep: 1}" in result.output, result.output


@pytest.mark.parametrize("case", ["ep-fp32-fused-subset", "ep-nf4-one-rank"])
def test_expert_parallel_experts_match_one_process(case: str, ddp_launch: dict) -> None:
    """dsft's experts under expert parallelism on transformers' engine (dsft.moe.parallel: all-to-all token dispatch,
    FSDP2 over fsdp 2 x ep 2), the model loaded whole and then split, against one unsharded process at the same
    global batch (tests/fsdp_worker.py ep_case): each rank holds half of every expert tensor (codes, scales, LoRA)
    and runs 4 of the 8 experts on local ids; logits, gradients (read from the local tensors in backward too) and the
    adapter after one AdamW step are the one process's; the NF4 codes are the bytes one process quantized.
    `fp32-fused-subset`: transformers' fused checkpoint layout, LoRA on SUBSET's experts, moved into padded slots
    when the layer is split (dsft.moe.lora.ExpertLoraLayer.pad_for_expert_parallel). `nf4-one-rank`: LoRA on every
    expert, every token routed to rank 0's experts, so rank 1's experts send and receive nothing, and it still
    trains. (NF4 with tokens on every expert: the `dsft sft` test above.)"""
    report = ddp_launch["sharding"][case]
    assert report["local_fraction"] == 0.5 and report["local_experts"] == [4]
    assert report["optimizer_local_fraction"] == 0.5  # the expert LoRA's AdamW state too
    assert report["unsharded_trainable"] == []  # every trainable tensor of an EP module is a sharded tensor
    assert report["logits_max_diff"] < 1e-5
    assert report["grad_max_rel"] < 1e-5
    assert report["param_max_diff"] < 1e-4  # AdamW's first step moves every element by about lr (1e-2) whatever its size
    assert report["codes_equal_one_process"] and report["expert_lora_params"] > 0
    # which experts' LoRA got a gradient: with every token on rank 0's experts, none of rank 1's
    if case.endswith("one-rank"):
        assert report["experts_with_grad"] == [0, 1, 2, 3]
    else:
        assert report["experts_with_grad_by_layer"] == {"1": [0, 1, 2, 5], "2": [1, 3]}
        assert report["padding_rows"] == [2] and report["padding_grad"] == 0.0 and report["saved_shapes_equal"]


@pytest.mark.parametrize("case", ["ep-fp32-per-expert-all-held", "ep-fp32-per-expert-subset-held",
                                  "ep-fp32-fused-all-held", "ep-nf4-fused-all-held", "ep-nf4-fused-subset-held"])
def test_every_layout_loaded_split_matches_one_process(case: str, ddp_launch: dict) -> None:
    """The rest of {fp32, NF4} x {DeepSeek's per-expert layout, transformers' fused one} x {LoRA on every expert, on a
    subset in padded slots}, each loaded as `training.parallel` loads it (rank 0's report; rank 1's, and the
    per-expert NF4 subset: the test below): half the experts' bytes read (whole tensors of its experts, or its rows
    of the fused ones), half the other bytes (under one tensor more), half of every expert tensor held, and one
    process's logits, gradients, adapter after an AdamW step, and NF4 bytes."""
    report = ddp_launch["sharding"][case]
    assert report["local_fraction"] == 0.5 and report["local_experts"] == [4] and report["unsharded_trainable"] == []
    assert report["expert_bytes_read"] * 2 == report["expert_bytes"]
    assert report["experts_read"] == ([] if "fused" in case else [0, 1, 2, 3])
    assert report["rest_bytes"] / 2 <= report["rest_bytes_read"] <= report["rest_bytes"] / 2 + report["rest_largest"]
    assert report["logits_max_diff"] < 1e-5 and report["grad_max_rel"] < 1e-5 and report["param_max_diff"] < 1e-4
    assert report["codes_equal_one_process"] and report.get("rest_nf4_equal_one_process", "nf4" not in case)
    if "subset" in case:
        assert report["experts_with_grad_by_layer"] == {"1": [0, 1, 2, 5], "2": [1, 3]}
        assert report["padding_rows"] == [2] and report["padding_grad"] == 0.0 and report["saved_shapes_equal"]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_policys_routing_profile_holds_only_its_shard_of_the_rest(rank: int, ddp_launch: dict) -> None:
    """A routing policy's profile under training.parallel (ep 2) runs on a companion of the base: the base's experts
    shared (no expert byte read again), the rest read as the rank's FSDP2 shards (half the bytes, under one tensor
    more), the base's own rest left as placeholders; each rank profiles half the rows and the summed counts are one
    process's, every row on the whole model. (End to end: the SimPO test above.)"""
    report = ddp_launch["sharding"][f"profile-rank{rank}"]
    assert report["counts_equal_one_process"] and report["layers"] == 2
    assert report["base_rest_still_placeholders"] and report["expert_bytes_read"] == 0
    assert report["rest_bytes"] / 2 <= report["rest_bytes_read"] <= report["rest_bytes"] / 2 + report["rest_largest"]


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_only_its_slice_and_splits_a_subsets_lora_into_padded_slots(rank: int,
                                                                                   ddp_launch: dict) -> None:
    """`training.parallel` with a fresh adapter, loaded as dsft loads it (a counting safe_open around every read):
    each rank reads from DeepSeek's per-expert checkpoint only the experts it will hold (rank 0 experts 0-3, rank 1
    experts 4-7; the others' tensors never read), exactly half the experts' bytes, and quantizes them alone (bytes
    equal to quantizing the whole layer in one process). Of every other tensor it reads only the rows of its FSDP2
    shards once the model is laid out (half the bytes, plus whole buffers: under one tensor more), and its NF4
    attention and shared-expert weights' codes and quantization state equal one process's bit for bit. Its expert LoRA, on a per-layer subset of the
    experts (tests/fsdp_worker.py SUBSET: layer 1 on experts 0, 1, 2 | 5, layer 2 on 1, 3 | none), is the rows of the
    one a single process initialises, in an equal block of padded slots on each rank, every one a sharded tensor.
    After expert parallelism and FSDP2, logits, gradients and the adapter after one AdamW step equal one unsharded
    process's; only the chosen experts get a gradient, the padding none; and the gathered adapter has the one-process
    layout. (LoRA on every expert, loaded the same way: the `dsft sft` test above.)"""
    report = ddp_launch["sharding"][f"ep-subset-held-rank{rank}"]
    assert report["experts_read"] == [4 * rank + e for e in range(4)]
    assert report["expert_bytes_read"] * 2 == report["expert_bytes"]
    assert report["rest_tensors_read"] == report["rest_tensors"]  # every one, a slice of each
    assert report["rest_bytes"] / 2 <= report["rest_bytes_read"] <= report["rest_bytes"] / 2 + report["rest_largest"]
    assert report["rest_nf4_equal_one_process"]
    assert report["local_fraction"] == 0.5 and report["local_experts"] == [4] and report["unsharded_trainable"] == []
    assert report["optimizer_local_fraction"] == 0.5  # of the padded slots' AdamW state
    assert report["padding_rows"] == [2] and report["padding_grad"] == 0.0
    assert report["logits_max_diff"] < 1e-5 and report["grad_max_rel"] < 1e-5 and report["param_max_diff"] < 1e-4
    assert report["experts_with_grad_by_layer"] == {"1": [0, 1, 2, 5], "2": [1, 3]}
    assert report["saved_shapes_equal"] and report["codes_equal_one_process"]


def test_four_processes_with_two_ranks_per_block_of_experts_match_one_process(tmp_path: Path) -> None:
    """Four processes (tests/fsdp_worker.py `four`, its ranks forked from one process that imported the stack once:
    torchrun's four imports cost 25 s of the suite's two cores; `four` also runs under torchrun, docs/multi-gpu.md):
    fsdp 4 x ep 2, so each block of experts is held by two ranks and FSDP2 splits it between them (the expert-FSDP
    axis); NF4, LoRA on a subset in padded slots. Every rank reads only its block's experts (half their bytes) and a
    quarter of the rest (under one tensor more), holds about a quarter of the expert tensors, and gives one process's
    logits, gradients, adapter after an AdamW step, and NF4 bytes (experts and the rest)."""
    from dsft.models.load import resolve_model_path

    resolve_model_path("builtin:tiny-deepseek-v3")  # built here if the session has not yet: no tensor work before a fork
    out = tmp_path / "four.json"
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("fsdp_worker.py")), "forked", str(out)],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert sorted(reports) == ["rank0", "rank1", "rank2", "rank3"]
    for rank, report in enumerate(reports[f"rank{r}"] for r in range(4)):
        assert report["experts_read"] == [4 * (rank % 2) + e for e in range(4)]
        assert report["expert_bytes_read"] * 2 == report["expert_bytes"]
        assert report["rest_bytes"] / 4 <= report["rest_bytes_read"] <= report["rest_bytes"] / 4 + report["rest_largest"]
        assert report["logits_max_diff"] < 1e-5 and report["grad_max_rel"] < 1e-5 and report["param_max_diff"] < 1e-4
        assert report["codes_equal_one_process"] and report["rest_nf4_equal_one_process"]
        assert report["experts_with_grad_by_layer"] == {"1": [0, 1, 2, 5], "2": [1, 3]} and report["padding_grad"] == 0.0
        assert report["unsharded_trainable"] == [] and abs(report["local_fraction"] - 0.25) < 0.01
    assert sum(reports[f"rank{r}"]["local_fraction"] for r in range(4)) == pytest.approx(1.0)  # each element once


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
