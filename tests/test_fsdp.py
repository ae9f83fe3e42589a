"""dsft's NF4 expert storage shards across processes: two gloo processes on CPU (tests/fsdp_worker.py)
train one step of the NF4 tiny model with LoRA on attention, shared and every routed expert, and match
one unsharded process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fused_checkpoint

from dsft.config.schema import ModelSection
from dsft.models.load import load_model, resolve_model_path
from dsft.moe.experts import DsftExperts

pytestmark = pytest.mark.slow  # subprocesses: in the full run (CI), not in `-m 'not slow'`


@pytest.fixture(scope="module")
def sharded_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One torchrun launch (two ranks) runs every case of tests/fsdp_worker.py."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "report.json"
    worker = Path(__file__).with_name("fsdp_worker.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(worker), str(out), str(fused_checkpoint(tmp))], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode,layout", [("fsdp2", "per-expert"), ("codes", "per-expert"), ("codes", "fused")])
def test_sharded_nf4_experts_match_one_process(mode: str, layout: str, sharded_report: dict) -> None:
    """`fsdp2`: FSDP2 shards the codes (a frozen parameter); `codes`: `model.shard_experts` has each
    rank read and quantize only its half of every layer's experts (from DeepSeek's per-expert layout or
    transformers' fused one) and gather the layer's codes when it runs (forward and backward)."""
    report = sharded_report[f"{mode}-{layout}"]
    assert report["packed_sharded"] and report["packed_local_fraction"] == 0.5  # each rank holds half the codes
    assert report["logits_max_diff"] < 1e-4
    if mode == "codes":  # quantized in halves, bit-identical to quantizing each layer whole
        assert report["logits_max_diff"] == 0.0
    assert report["missing"] == [] and report["expert_lora_params"] > 0
    assert report["param_max_diff"] < 1e-4  # after one AdamW step, gathered adapter == unsharded run's


def test_nf4_codes_are_a_frozen_parameter() -> None:
    """A parameter, so FSDP2 shards them and torch.distributed.checkpoint finds every parameter in the
    state dict; frozen, so adapter files and the Trainer's adapter-only FSDP checkpoints leave them out.
    Not a buffer: DDP broadcasts every buffer from rank 0 before each forward."""
    section = ModelSection(path="builtin:tiny-deepseek-v3", dtype="float32", quantization="nf4")
    model = load_model(section, resolve_model_path(section.path))
    experts = next(m for m in model.modules() if isinstance(m, DsftExperts))
    assert sum(b.numel() for b in model.buffers()) < 100  # rotary tables and correction biases only
    codes = experts.gate_up_nf4.packed
    assert isinstance(codes, torch.nn.Parameter) and codes.dtype == torch.uint8 and not codes.requires_grad
    state = experts.state_dict()
    assert torch.equal(state["gate_up_nf4.packed"], codes)
    before = experts.gate_up_nf4.dequantize().clone()
    experts.load_state_dict(state, strict=True)
    assert torch.equal(experts.gate_up_nf4.dequantize(), before)
