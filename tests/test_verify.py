"""`merge --verify` on checkpoints laid out as released, and merges broken on purpose that it must catch.

Bases: a bf16, per-expert DeepSeek-V2-Lite-like checkpoint with yarn rope, and an FP8 DeepSeek-V3-like one
(e4m3 with block scales and partial edge blocks, an MTP layer at index num_hidden_layers, vocab padded past
the tokenizer, sharded). The run carries a random (not zero) adapter on attention, shared experts, dense
MLP and routed experts {1: [0, 3], 2: [5]}.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsft.export.merge import merge, resolve
from dsft.export.verify import verify
from dsft.models.load import resolve_model_path
from test_merge import make_run
from conftest import released_v3

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def _v2_lite_like(tmp_path: Path) -> Path:
    src, dst = resolve_model_path("builtin:tiny-deepseek-v2"), tmp_path / "v2-lite"
    shutil.copytree(src, dst)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()},
              dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config.update(rope_scaling=YARN, torch_dtype="bfloat16")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("v2")
    return make_run(tmp, _v2_lite_like(tmp))


@pytest.fixture(scope="module")
def v3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("v3")
    return make_run(tmp, released_v3(tmp))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def test_verify_passes_on_a_bf16_per_expert_base(v2_run: Path, tmp_path: Path, cli) -> None:
    """Before: FAILED on every correct bf16 merge (a tolerance for fp32 files)."""
    result = cli("merge", "--adapter", v2_run, "--out", tmp_path / "merged", "--verify")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "merged/dsft-merge.json").read_text())
    report = record["verify"]
    assert report["ok"] and report["exact"]["touched"] == record["touched_tensors"] > 20
    assert report["exact"]["mismatched"] == 0
    assert report["exact"]["bit_equal"] == report["exact"]["touched"] + report["exact"]["untouched"]
    assert report["logits"]["floor_mean_abs"] > 0  # bf16 rounding costs something, and only that
    assert "verdict" in result.output and "FAILED" not in result.output


def test_verify_passes_on_an_fp8_base_for_bf16_and_fp8_outputs(v3_run: Path, tmp_path: Path) -> None:
    """Before: a dtype-promotion crash after writing, and transformers' CPU FP8 path on partial blocks."""
    source = resolve(v3_run, None)
    for out, options in (("bf16", {}), ("fp8", {"dtype": "fp8"}), ("requant", {"dtype": "fp8", "requantize": True})):
        record = merge(source, tmp_path / out, progress=False, **options)
        report = verify(source, tmp_path / out, record)
        assert report["ok"], (out, report)
        assert report["exact"]["touched"] == record["touched_tensors"] > 0


def test_fp8_output_keeps_untouched_units_and_the_fine_tune(v3_run: Path, tmp_path: Path) -> None:
    source = resolve(v3_run, None)
    base = _tensors(source.base)
    record = merge(source, tmp_path / "fp8", dtype="fp8", progress=False)
    out = _tensors(tmp_path / "fp8")
    touched_linear = "model.layers.1.self_attn.o_proj.weight"
    assert out[touched_linear].dtype == torch.bfloat16 and touched_linear + "_scale_inv" not in out
    # layer 1's experts are one unit: all in bf16 as soon as one of them is adapted
    assert out["model.layers.1.mlp.experts.1.gate_proj.weight"].dtype == torch.bfloat16
    # the MTP layer (index num_hidden_layers) is carried unadapted: its FP8 units stay as released
    untouched = [k for k in base if base[k].dtype == torch.float8_e4m3fn and "layers.3." in k]
    assert untouched and all(_bits(out[k]).equal(_bits(base[k])) and out[k + "_scale_inv"].equal(base[k + "_scale_inv"])
                             for k in untouched)
    assert record["retention"] >= 0.99
    quant = json.loads((tmp_path / "fp8/config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.experts" in quant["modules_to_not_convert"] == quant["ignored_layers"]
    assert "model.layers.1.self_attn.o_proj" in quant["ignored_layers"]
    assert not any(unit.startswith("model.layers.3.") for unit in quant["ignored_layers"])  # MTP: FP8 as released
    assert record["size_bytes"]["merged"] > record["size_bytes"]["base"]

    requant = merge(source, tmp_path / "requant", dtype="fp8", requantize=True, progress=False)
    assert _tensors(tmp_path / "requant")[touched_linear].dtype == torch.float8_e4m3fn
    assert requant["retention"] < record["retention"]

    # a fine-tune of a realistic size (deltas ~1% of a weight, an e4m3 step ~6%): re-quantizing loses much of
    # it, which is reported; bf16 units keep it
    small = _scaled_adapter(v3_run, tmp_path / "small", 0.1)
    kept = merge(resolve(small, None), tmp_path / "small-fp8", dtype="fp8", progress=False)
    lost = merge(resolve(small, None), tmp_path / "small-requant", dtype="fp8", requantize=True, progress=False)
    assert kept["retention"] >= 0.99 and lost["retention"] < 0.9, (kept["retention"], lost["retention"])


def _scaled_adapter(run: Path, dst: Path, factor: float) -> Path:
    """A copy of the run whose LoRA B matrices (so its deltas) are `factor` times as large."""
    shutil.copytree(run, dst)
    path = dst / "adapter/adapter_model.safetensors"
    weights = load_file(path)
    save_file({k: v * factor if "_B" in k else v for k, v in weights.items()}, path)
    return dst


def _broken(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Merges wrong in one way each, as a bug in the merge's own mapping would make them."""
    from dsft.export import merge as merge_module
    from dsft.models.fp8 import dequantize

    original_merged, original_read = merge_module.merged, merge_module.read_adapter

    def merged(key, base, adapter):
        result = original_merged(key, base, adapter)
        delta = result - base.float()
        if how == "scale" and key.endswith("q_proj.weight"):
            return base.float() + 1.01 * delta
        if how == "transposed" and key == "model.layers.1.self_attn.o_proj.weight":
            return base.float() + delta.T
        if how == "dropped" and ".mlp.experts.3." in key:
            return base.float()
        return result

    def wrong_index(path, *args, **kwargs):
        adapter = original_read(path, *args, **kwargs)
        experts = adapter.experts["model.layers.1.mlp.experts"]
        experts.ids = [1 if e == 0 else e for e in experts.ids]  # expert 0's delta written onto expert 1
        return adapter

    def merged_rows(key, base, adapter, dtype, fp8=None):  # the row-blocked path of LoRA'd Linears, broken alike
        rows = original_rows(key, base, adapter, dtype, fp8=fp8)
        whole = base if fp8 is None else dequantize(base, *fp8)
        return None if rows is None else (merged(key, whole, adapter).to(dtype), *rows[1:])

    original_rows = merge_module.merged_rows
    monkeypatch.setattr(merge_module, "merged", merged)
    monkeypatch.setattr(merge_module, "merged_rows", merged_rows)
    if how == "index":
        monkeypatch.setattr(merge_module, "read_adapter", wrong_index)


@pytest.mark.parametrize("how", ["scale", "dropped", "transposed", "index"])
def test_a_wrong_merge_fails_verification(how: str, v2_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve(v2_run, None)
    with monkeypatch.context() as patch:
        _broken(patch, how)
        record = merge(source, tmp_path / "merged", progress=False)
    report = verify(source, tmp_path / "merged", record)
    assert not report["ok"] and not report["exact"]["ok"] and report["exact"]["mismatched"] > 0, report["exact"]
    if how in ("transposed", "index"):  # large enough that the logits alone show it
        assert not report["logits"]["ok"], report["logits"]


def test_verify_through_the_cli_exits_1_on_a_wrong_merge(v2_run: Path, tmp_path: Path, cli,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _broken(monkeypatch, "dropped")
    result = cli("merge", "--adapter", v2_run, "--out", tmp_path / "merged", "--verify")
    assert result.exit_code == 1 and "FAILED" in result.output
    assert json.loads((tmp_path / "merged/dsft-merge.json").read_text())["verify"]["ok"] is False


def test_built_in_v3_carries_the_routing_keys_engines_read(tmp_path: Path, cli) -> None:
    from dsft.arch import missing_engine_keys

    config = json.loads((resolve_model_path("builtin:tiny-deepseek-v3") / "config.json").read_text())
    assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"
    assert missing_engine_keys(config) == []
    assert missing_engine_keys({**config, "topk_method": None} | {}) == [] and \
        missing_engine_keys({k: v for k, v in config.items() if k != "topk_method"}) == ["topk_method"]


def test_merge_reports_a_base_config_without_engine_keys(tmp_path: Path) -> None:
    src, dst = resolve_model_path("builtin:tiny-deepseek-v3"), tmp_path / "base"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in ("topk_method", "scoring_func")}))
    run = make_run(tmp_path, dst)
    record = merge(resolve(run, None), tmp_path / "merged", progress=False)
    assert record["config_missing_engine_keys"] == ["topk_method", "scoring_func"]


def _fp8_dividing_blocks(tmp_path: Path) -> Path:
    """The tiny V3 in FP8 with 8x8 blocks, which divide every projection's shape."""
    from dsft.models.fp8 import quantize

    src, dst = resolve_model_path("builtin:tiny-deepseek-v3"), tmp_path / "fp8-base"
    shutil.copytree(src, dst)
    out = {}
    for key, t in load_file(src / "model.safetensors").items():
        if t.dim() == 2 and key.endswith(("proj.weight", "proj_with_mqa.weight")):
            out[key], out[key + "_scale_inv"] = quantize(t, (8, 8))
        else:
            out[key] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [8, 8],
                                     "activation_scheme": "dynamic"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _transformers_matches_dsft(out: Path, rel: float, device: str = "cpu") -> None:
    from transformers import AutoModelForCausalLM

    from dsft.models.stream import load_streaming

    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]], device=device)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16 if device != "cpu" else torch.float32,
                                                  device_map=device)
    ours = load_streaming(out, torch.float32, False, torch.device(device))
    with torch.no_grad():
        a, b = theirs(ids).logits.float(), ours(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) < rel


def test_transformers_loads_the_fp8_output(tmp_path: Path) -> None:
    """FP8 units as written, bf16 units declared in modules_to_not_convert: transformers loads the directory
    (on CPU it dequantizes FP8 to bf16, hence the bf16-sized tolerance) and computes what dsft's loader does."""
    run = make_run(tmp_path, _fp8_dividing_blocks(tmp_path))
    merge(resolve(run, None), tmp_path / "fp8", dtype="fp8", progress=False)
    _transformers_matches_dsft(tmp_path / "fp8", rel=2e-2)


@pytest.mark.gpu
def test_transformers_loads_the_partial_block_fp8_output_on_gpu(v3_run: Path, tmp_path: Path) -> None:
    """transformers' GPU FP8 kernels on the V3-layout output with partial edge blocks (CPU: dsft only)."""
    merge(resolve(v3_run, None), tmp_path / "fp8", dtype="fp8", progress=False)
    _transformers_matches_dsft(tmp_path / "fp8", rel=5e-2, device="cuda")
