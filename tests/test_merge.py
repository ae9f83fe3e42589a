"""`dsft merge`: the base's own layout, exact logits, byte-identical untouched tensors, bounded memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import REPO, fused_checkpoint
from dsft.adapters.lora import attach_lora, load_lora
from dsft.adapters.metadata import build_metadata, write_metadata
from dsft.config.schema import AdapterSection, ModelSection
from dsft.errors import DsftError
from dsft.export.merge import merge, resolve
from dsft.export.safetensors_io import ByteMeter
from dsft.models.identity import model_identity
from dsft.models.load import load_model, resolve_model_path
from dsft.models.stream import shard_files

ADAPTER = AdapterSection(r=4, alpha=8, routed_experts={1: [0, 3], 2: [5]})
SELECTION = {1: [0, 3], 2: [5]}


def _base(path: Path | str, dtype: str = "float32", quantization: str = "none"):
    return load_model(ModelSection(path=str(path), dtype=dtype, quantization=quantization), resolve_model_path(str(path)))


def make_run(tmp: Path, base: Path | str, adapter: AdapterSection = ADAPTER, selection=SELECTION, seed: int = 0) -> Path:
    """A run directory holding a random (not zero) adapter, as `dsft sft` would leave it."""
    torch.manual_seed(seed)
    peft_model, targets = attach_lora(_base(base), adapter, selection)
    for p in peft_model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    run = tmp / f"run-{seed}"
    peft_model.save_pretrained(run / "adapter")
    path = resolve_model_path(str(base))
    write_metadata(run / "adapter", build_metadata(peft_model, adapter, targets, model_identity(path, str(base))))
    recipe = {"model": {"path": str(base), "dtype": "float32", "quantization": "none"},
              "data": {"train": [str(REPO / "data_templates/legal/eval.jsonl")], "format": "messages"},
              "output_dir": str(run)}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in shard_files(path):
        out.update(load_file(shard))
    return out


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _check_merged(run: Path, base: Path | str, out: Path, rtol: float) -> None:
    base_path = resolve_model_path(str(base))
    before, after = _tensors(base_path), _tensors(out)
    assert {k: (v.shape, v.dtype) for k, v in after.items()} == {k: (v.shape, v.dtype) for k, v in before.items()}
    touched = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".mlp.experts.0." in k or "experts.gate_up_proj" in k for k in touched)
    assert not any("embed_tokens" in k or "norm" in k or "mlp.gate." in k for k in touched)
    merged, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = _logits(load_lora(_base(base), str(run / "adapter")))
    got = _logits(merged)
    assert ((got - expected).abs().max() / expected.abs().max()) <= rtol


def test_merge_per_expert_layout_exactly(tmp_path: Path) -> None:
    run = make_run(tmp_path, "builtin:tiny-deepseek-v3")
    record = merge(resolve(run, None), tmp_path / "merged", progress=False)
    _check_merged(run, "builtin:tiny-deepseek-v3", tmp_path / "merged", rtol=1e-5)
    assert record["touched_tensors"] == 15 + 6 + 3 + 3 * 3
    assert json.loads((tmp_path / "merged/dsft-merge.json").read_text())["shards_sha256"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "merged" / name).is_file(), name
    base = resolve_model_path("builtin:tiny-deepseek-v3")
    with safe_open(str(base / "model.safetensors"), "pt") as b, safe_open(str(tmp_path / "merged/model.safetensors"), "pt") as m:
        for key in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.1.gate_proj.weight", "lm_head.weight"):
            assert b.get_tensor(key).numpy().tobytes() == m.get_tensor(key).numpy().tobytes()


def test_merge_adds_exactly_the_training_layers_delta(tmp_path: Path) -> None:
    """One weight change: what merge adds to an expert's weight (per-expert and fused layouts) is the training
    layer's get_delta_weight, bit for bit (both are dsft.moe.delta.lora_delta)."""
    from dsft.moe.lora import ExpertLoraLayer

    run = make_run(tmp_path, "builtin:tiny-deepseek-v3")
    merge(resolve(run, None), tmp_path / "merged", progress=False)
    before, after = _tensors(resolve_model_path("builtin:tiny-deepseek-v3")), _tensors(tmp_path / "merged")
    trained = load_lora(_base("builtin:tiny-deepseek-v3"), str(run / "adapter"))
    layers = {n.split(".mlp.")[0].rsplit(".", 1)[-1]: m for n, m in trained.named_modules() if isinstance(m, ExpertLoraLayer)}
    checked = 0
    for layer, experts in SELECTION.items():
        for e in experts:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                key = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                delta = layers[str(layer)].get_delta_weight("default", e, proj)
                assert torch.equal(after[key], before[key] + delta), key
                checked += 1
    assert checked == 9
    unchosen = "model.layers.1.mlp.experts.1.up_proj.weight"
    assert torch.equal(after[unchosen], before[unchosen])


def test_merge_fused_layout(tmp_path: Path) -> None:
    fused = fused_checkpoint(tmp_path)
    assert "model.layers.1.mlp.experts.gate_up_proj" in _tensors(fused)
    run = make_run(tmp_path, fused)
    merge(resolve(run, None), tmp_path / "merged", progress=False)
    _check_merged(run, fused, tmp_path / "merged", rtol=1e-5)


def test_merge_bf16_base_rounds_once(tmp_path: Path) -> None:
    src, dst = resolve_model_path("builtin:tiny-deepseek-v3"), tmp_path / "bf16"
    shutil.copytree(src, dst)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()},
              dst / "model.safetensors", metadata={"format": "pt"})
    run = make_run(tmp_path, dst)
    merge(resolve(run, None), tmp_path / "merged", progress=False)
    assert all(v.dtype == torch.bfloat16 for v in _tensors(tmp_path / "merged").values())
    _check_merged(run, dst, tmp_path / "merged", rtol=2e-2)


def test_merge_from_an_nf4_run_uses_the_original_weights(make_recipe, cli, tmp_path: Path) -> None:
    recipe = make_recipe(model={"quantization": "nf4"}, adapter={"routed_experts": {1: [0, 3]}}, training={"max_steps": 3})
    assert cli("sft", "--recipe", recipe).exit_code == 0
    result = cli("merge", "--adapter", tmp_path / "run", "--out", tmp_path / "merged", "--verify")
    assert result.exit_code == 0, result.output
    assert "quantization error" in result.output and "ok" in result.output
    _check_merged(tmp_path / "run", "builtin:tiny-deepseek-v3", tmp_path / "merged", rtol=1e-5)


def test_merge_memory_follows_the_largest_shard(tmp_path: Path) -> None:
    sharded = _sharded_base(tmp_path)
    shards = shard_files(sharded)
    assert len(shards) >= 8
    run = make_run(tmp_path, sharded)
    meter = ByteMeter()
    merge(resolve(run, None), tmp_path / "merged", meter=meter, progress=False)
    adapter_bytes = (run / "adapter/adapter_model.safetensors").stat().st_size
    largest = max(s.stat().st_size for s in shards)
    assert meter.peak <= largest + adapter_bytes, (meter.peak, largest, adapter_bytes)
    assert sum(s.stat().st_size for s in shards) > 2 * (largest + adapter_bytes)
    _check_merged(run, sharded, tmp_path / "merged", rtol=1e-5)
    index = json.loads((tmp_path / "merged/model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(sharded))


def _sharded_base(tmp_path: Path) -> Path:
    """The tiny model saved as many small shards, with its tokenizer."""
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-deepseek-v3")).save_pretrained(
        sharded, max_shard_size="48KB")
    for f in resolve_model_path("builtin:tiny-deepseek-v3").glob("tokenizer*"):
        shutil.copy(f, sharded / f.name)
    return sharded


def _merge_interrupted(run: Path, out: Path, after: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ctrl-C as the merge starts shard `after` + 1; returns the names of the shards it began."""
    from dsft.export import merge as merge_module

    original, began = merge_module.ShardWriter.write, []

    def write_or_stop(self, src, dst):
        began.append(src.name)
        if len(began) > after:
            raise KeyboardInterrupt
        return original(self, src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(merge_module.ShardWriter, "write", write_or_stop)
        with pytest.raises(KeyboardInterrupt):
            merge(resolve(run, None), out, progress=False)
    return began


def test_interrupted_merge_continues_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after three shards leaves no --out; the same merge again writes only the other shards
    (a half-written one from a kill -9 included) and ends with the uninterrupted merge's bytes."""
    from dsft.export import merge as merge_module

    sharded = _sharded_base(tmp_path)
    run = make_run(tmp_path, sharded)
    names = [s.name for s in shard_files(sharded)]
    whole = merge(resolve(run, None), tmp_path / "whole", progress=False)
    assert _merge_interrupted(run, tmp_path / "merged", 3, monkeypatch) == names[:4]
    partial = tmp_path / ".merged.dsft-partial"
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in partial.glob("*.safetensors")) == sorted(names[:3])
    (partial / f"{names[3]}.part").write_bytes(b"cut short by kill -9")

    original, written = merge_module.ShardWriter.write, []
    monkeypatch.setattr(merge_module.ShardWriter, "write", lambda self, src, dst: written.append(src.name) or original(self, src, dst))
    record = merge(resolve(run, None), tmp_path / "merged", progress=False)
    assert written == names[3:]
    assert record["shards_sha256"] == whole["shards_sha256"]
    assert record["touched_tensors"] == whole["touched_tensors"]
    assert not partial.exists()
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    _check_merged(run, sharded, tmp_path / "merged", rtol=1e-5)


def test_unfinished_merge_of_another_adapter_is_discarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sharded = _sharded_base(tmp_path)
    run, other = make_run(tmp_path, sharded), make_run(tmp_path, sharded, seed=1)
    _merge_interrupted(run, tmp_path / "merged", 4, monkeypatch)
    record = merge(resolve(other, None), tmp_path / "merged", progress=False)
    assert record["adapter"] == str((other / "adapter").resolve())
    fresh = merge(resolve(other, None), tmp_path / "fresh", progress=False)
    assert record["shards_sha256"] == fresh["shards_sha256"]
    _check_merged(other, sharded, tmp_path / "merged", rtol=1e-5)


def test_two_merges_into_one_out_are_refused(tmp_path: Path) -> None:
    import fcntl

    run = make_run(tmp_path, "builtin:tiny-deepseek-v3")
    partial = tmp_path / ".merged.dsft-partial"
    partial.mkdir()
    with open(partial / ".dsft.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DsftError, match="another dsft process is writing it"):
            merge(resolve(run, None), tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_merge_errors_exit_2(tmp_path: Path, cli) -> None:
    run = make_run(tmp_path, "builtin:tiny-deepseek-v3")
    v2 = resolve_model_path("builtin:tiny-deepseek-v2")
    result = cli("merge", "--adapter", run, "--out", tmp_path / "a", "--base", v2)
    assert result.exit_code == 2 and "is not the model this adapter was trained on: model_type 'deepseek_v2'" in result.output

    wider = tmp_path / "wider"
    shutil.copytree(resolve_model_path("builtin:tiny-deepseek-v3"), wider)
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    result = cli("merge", "--adapter", run, "--out", tmp_path / "b", "--base", wider)
    assert result.exit_code == 2 and "num_hidden_layers 4 (adapter: 3)" in result.output

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-deepseek-v3")).save_pretrained(
        sharded, max_shard_size="200KB")
    shard_files(sharded)[1].unlink()
    result = cli("merge", "--adapter", run, "--out", tmp_path / "c", "--base", sharded)
    assert result.exit_code == 2 and "missing shards" in result.output

    v2_run = make_run(tmp_path, "builtin:tiny-deepseek-v2", seed=1)
    result = cli("merge", "--adapter", v2_run, "--out", tmp_path / "d", "--base", resolve_model_path("builtin:tiny-deepseek-v3"))
    assert result.exit_code == 2 and "model_type 'deepseek_v3' (adapter: 'deepseek_v2')" in result.output

    (tmp_path / "e").mkdir()
    (tmp_path / "e/notes.txt").write_text("mine")
    result = cli("merge", "--adapter", run, "--out", tmp_path / "e")
    assert result.exit_code == 2 and "holds files dsft did not write (notes.txt)" in result.output
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_merge_fp8_base_to_bf16_and_back_to_fp8(tmp_path: Path) -> None:
    from test_qlora import _fp8_checkpoint

    from dsft.models.stream import load_streaming

    fp8 = tmp_path / "fp8"
    _fp8_checkpoint(resolve_model_path("builtin:tiny-deepseek-v3"), fp8)
    run = make_run(tmp_path, fp8)
    merge(resolve(run, None), tmp_path / "bf16", progress=False)
    out = _tensors(tmp_path / "bf16")
    assert not any(k.endswith("_scale_inv") for k in out)
    assert out["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((tmp_path / "bf16/config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    expected = _logits(load_lora(_base(fp8), str(run / "adapter")))
    assert ((_logits(merged) - expected).abs().max() / expected.abs().max()) < 5e-2

    merge(resolve(run, None), tmp_path / "f8", dtype="fp8", requantize=True, progress=False)
    again = _tensors(tmp_path / "f8")
    source = _tensors(fp8)
    assert {k: (v.shape, v.dtype) for k, v in again.items()} == {k: (v.shape, v.dtype) for k, v in source.items()}
    touched, untouched = "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.experts.1.gate_proj.weight"
    assert not torch.equal(again[touched + "_scale_inv"], source[touched + "_scale_inv"])
    for key in (untouched, untouched + "_scale_inv", "model.embed_tokens.weight"):
        assert again[key].view(torch.uint8).equal(source[key].view(torch.uint8)) if again[key].dtype != torch.float32 \
            else torch.equal(again[key], source[key])
    requant = load_streaming(tmp_path / "f8", torch.float32, quantized=False, device=torch.device("cpu")).state_dict()
    bf16 = out[touched].float()
    assert ((requant[touched] - bf16).norm() / bf16.norm()) < 0.04  # e4m3 rounding of the merged weight


def test_plain_peft_adapter_merges(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = resolve_model_path("builtin:tiny-deepseek-v3")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "o_proj"]))
    for p in peft_model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    expected = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "plain")
    merge(resolve(tmp_path / "plain", base), tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert ((_logits(merged) - expected).abs().max() / expected.abs().max()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_blocked_linear_merge_is_the_whole_tensor_merge(dtype: torch.dtype) -> None:
    """A LoRA'd Linear is merged a block of rows at a time (no full-size fp32 result or delta): the
    same bits as the whole-tensor merge rounded once, and the same retention sums."""
    from dsft.adapters.weights import Adapter
    from dsft.export.adapter import merged, merged_rows, retention_sums

    torch.manual_seed(0)
    base = torch.randn(37, 64).to(dtype)  # 37 rows: the last block partial
    adapter = Adapter()
    adapter.linear["model.layers.0.self_attn.o_proj.weight"] = (torch.randn(4, 64), torch.randn(37, 4), 0.5)
    written, dot, norm2 = merged_rows("model.layers.0.self_attn.o_proj.weight", base, adapter, dtype, rows=8)
    whole = merged("model.layers.0.self_attn.o_proj.weight", base, adapter)
    assert written.dtype == dtype and torch.equal(written, whole.to(dtype))
    assert (dot, norm2) == pytest.approx(retention_sums(base, whole, whole.to(dtype)), rel=1e-6)
    assert not torch.equal(written, base)
    assert merged_rows("model.layers.0.mlp.experts.0.up_proj.weight", base, adapter, dtype) is None


def test_row_blocked_merge_of_an_fp8_linear_dequantizes_like_the_whole_tensor() -> None:
    """FP8 with partial edge tiles (37 x 70 in 16 x 16 blocks): dequantized a block of rows at a time."""
    from dsft.adapters.weights import Adapter
    from dsft.export.adapter import merged, merged_rows
    from dsft.models.fp8 import dequantize, quantize

    torch.manual_seed(1)
    q, scale = quantize(torch.randn(37, 70), (16, 16))
    adapter = Adapter()
    adapter.linear["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] = (torch.randn(4, 70), torch.randn(37, 4), 2.0)
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    for rows in (1, 16, 20, 64):  # rounded to whole tiles of rows
        written, _, _ = merged_rows(key, q, adapter, torch.bfloat16, rows=rows, fp8=(scale, (16, 16)))
        assert torch.equal(written, merged(key, dequantize(q, scale, (16, 16)), adapter).to(torch.bfloat16)), rows
