"""`dsft export --format vllm`: every weight change rebuilt from the exported files by vLLM's rules (one
scaling for the adapter, per-expert gate / up / down) equals what `dsft merge` writes for the same run;
exports broken in the ways that matter are caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsft.config.schema import AdapterSection
from dsft.export.merge import merge, resolve
from dsft.export.unmerged import export
from dsft.export.vllm import check, deltas
from dsft.models.load import resolve_model_path
from test_merge import make_run

# per-group ranks and alphas: the scales differ by group, which vLLM's single r / lora_alpha cannot express
MOE_ADAPTER = AdapterSection(r=4, alpha=8, attention={"r": 8, "alpha": 4}, dense_mlp={"r": 2, "alpha": 16},
                             routed_experts={"experts": {1: [0, 3], 2: [5]}, "r": 6, "alpha": 3})


def mismatches(export: Path, merged: Path, base: Path | str) -> list[str]:
    """Tensors where base + the export's vLLM delta differs from the merged checkpoint (fp32 rounding aside)."""
    base_t, merged_t = load_file(resolve_model_path(str(base)) / "model.safetensors"), load_file(merged / "model.safetensors")
    change = deltas(export)
    wrong = [k for k, d in change.items() if not torch.allclose(base_t[k].float() + d, merged_t[k].float(), rtol=1e-5, atol=1e-6)]
    wrong += [k for k in merged_t if k not in change and not torch.equal(merged_t[k], base_t[k])]  # a change not exported
    return wrong


def _run_and_merge(tmp: Path, base: str, adapter: AdapterSection, selection) -> tuple[Path, Path]:
    run = make_run(tmp, base, adapter, selection)
    merge(resolve(run, None), tmp / "merged", progress=False)
    return run, tmp / "merged"


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _run_and_merge(tmp_path_factory.mktemp("moe"), "builtin:tiny-deepseek-v3", MOE_ADAPTER, {1: [0, 3], 2: [5]})


def test_moe_export_rebuilds_the_merge_by_vllms_rules(moe_run: tuple[Path, Path], tmp_path: Path, cli) -> None:
    run, merged = moe_run
    result = cli("export", "--adapter", run, "--format", "vllm", "--out", tmp_path / "vllm")
    assert result.exit_code == 0, result.output
    out = tmp_path / "vllm"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and "rank_pattern" not in config and not config["modules_to_save"]
    assert "--max-lora-rank 8" in result.output
    assert check(out, resolve_model_path("builtin:tiny-deepseek-v3")) == []
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    experts = {k.split(".mlp.experts.")[1].split(".")[0] for k in keys if ".layers.1.mlp.experts." in k}
    assert experts == {str(e) for e in range(8)}  # every expert of an adapted layer, zero where not adapted
    assert mismatches(out, merged, "builtin:tiny-deepseek-v3") == []
    change = deltas(out)
    assert not change["model.layers.1.mlp.experts.1.up_proj.weight"].any()  # expert 1 was not adapted


def test_dense_export_rebuilds_the_merge(tmp_path: Path, cli) -> None:
    adapter = AdapterSection(r=4, alpha=8, attention={"r": 8, "alpha": 32})
    run, merged = _run_and_merge(tmp_path, "builtin:tiny-deepseek-llm", adapter, {})
    result = cli("export", "--adapter", run, "--format", "vllm", "--out", tmp_path / "vllm")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())  # head_dim 16: no `vllm serve` line vLLM could not keep
    assert "vllm serve" not in flat and "attention heads are 16 wide and vLLM serves heads from 32 wide" in flat
    assert check(tmp_path / "vllm", resolve_model_path("builtin:tiny-deepseek-llm")) == []
    assert mismatches(tmp_path / "vllm", merged, "builtin:tiny-deepseek-llm") == []


def _broken_export(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    from dsft.export import vllm

    original_tensors, original_config = vllm.vllm_tensors, vllm.adapter_config

    def tensors(adapter, config):
        out, rank = original_tensors(adapter, config)
        p = "base_model.model.model.layers.1.mlp.experts"
        if how == "missing-expert":
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for ab in ("A", "B"):
                    out.pop(f"{p}.7.{proj}.lora_{ab}.weight")
        if how == "swapped-gate-up":
            g, u = f"{p}.0.gate_proj.lora_B.weight", f"{p}.0.up_proj.lora_B.weight"
            out[g], out[u] = out[u], out[g]
        if how == "wrong-index":
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for ab in ("A", "B"):
                    a, b = f"{p}.0.{proj}.lora_{ab}.weight", f"{p}.1.{proj}.lora_{ab}.weight"
                    out[a], out[b] = out[b], out[a]
        if how == "rank-pattern":  # the per-module scales left to rank_pattern / alpha_pattern, as PEFT writes them
            for (key, (a, b, scale)) in adapter.linear.items():
                out[f"base_model.model.{key.removesuffix('.weight')}.lora_B.weight"] = b.float().contiguous()
        return out, rank

    def config(tensors, rank, base):
        cfg = original_config(tensors, rank, base)
        if how == "rank-pattern":
            cfg.update(r=4, lora_alpha=8, rank_pattern={"self_attn": 8}, alpha_pattern={"self_attn": 4})
        return cfg

    monkeypatch.setattr(vllm, "vllm_tensors", tensors)
    monkeypatch.setattr(vllm, "adapter_config", config)
    monkeypatch.setattr(vllm, "check", lambda directory, base: [])  # let the broken export be written


@pytest.mark.parametrize("how", ["rank-pattern", "missing-expert", "swapped-gate-up", "wrong-index"])
def test_a_broken_export_is_caught(how: str, moe_run: tuple[Path, Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run, merged = moe_run
    with monkeypatch.context() as patch:
        _broken_export(patch, how)
        export(resolve(run, None), tmp_path / "vllm", "vllm")
    problems = check(tmp_path / "vllm", resolve_model_path("builtin:tiny-deepseek-v3"))
    wrong = mismatches(tmp_path / "vllm", merged, "builtin:tiny-deepseek-v3")
    assert problems or wrong, how
    if how == "rank-pattern":
        assert any("rank_pattern" in p for p in problems) and wrong  # and vLLM's one scaling mis-scales it
    if how == "missing-expert":
        assert any("expert 7" in p for p in problems)
    if how in ("swapped-gate-up", "wrong-index"):
        assert wrong


def test_what_vllm_cannot_serve_is_refused(tmp_path: Path, cli) -> None:
    router = make_run(tmp_path, "builtin:tiny-deepseek-v3", AdapterSection(r=4, alpha=8, router="trainable"), {}, seed=1)
    result = cli("export", "--adapter", router, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "(adapter.router: trainable), which vLLM cannot serve" in result.output
    mixtral = make_run(tmp_path, "builtin:tiny-mixtral", AdapterSection(r=4, alpha=8, routed_experts={1: [0]}), {1: [0]}, seed=2)
    result = cli("export", "--adapter", mixtral, "--out", tmp_path / "b")
    assert result.exit_code == 2 and "vLLM has no per-expert LoRA for mixtral routed experts" in result.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/x.txt").write_text("x")
    run = make_run(tmp_path, "builtin:tiny-deepseek-v3", seed=3)
    result = cli("export", "--adapter", run, "--out", tmp_path / "mine", "--force")
    assert result.exit_code == 2 and "holds files dsft did not write" in result.output
    result = cli("export", "--adapter", run, "--out", run, "--force")
    assert result.exit_code == 2 and "is the run being exported" in result.output
    assert not any((tmp_path / n).exists() for n in "ab")
