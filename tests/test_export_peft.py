"""`dsft export --format peft`: the export loads with stock transformers + PEFT exactly as the model card
says (in a process that never imports dsft), PEFT leaves its config as written, and its logits equal dsft's
adapter model's; exports broken the ways that matter (an expert's delta on its neighbour, B's columns
expert-major instead of rank-major) give other logits, and the export's own check refuses wrong names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsft.adapters.lora import load_lora
from dsft.config.schema import AdapterSection
from dsft.export.merge import resolve
from dsft.export.unmerged import export
from dsft.models.load import resolve_model_path
from test_export_vllm import MOE_ADAPTER
from test_merge import _base, make_run

HERE = Path(__file__).parent
IDS = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
EXPERTS = "base_model.model.model.layers.1.mlp.experts"


def _dsft_logits(run: Path, base: str) -> torch.Tensor:
    with torch.no_grad():
        return load_lora(_base(base), str(run / "adapter"))(IDS).logits


def _broken(export_dir: Path, out: Path, how: str) -> Path:
    """A copy of the export with the routed-expert LoRA of layer 1 laid out wrongly."""
    import shutil

    shutil.copytree(export_dir, out)
    tensors = load_file(export_dir / "adapter_model.safetensors")
    experts = 8
    for where in (f"{EXPERTS}.base_layer", EXPERTS):
        a, b = tensors[f"{where}.lora_A.weight"], tensors[f"{where}.lora_B.weight"]
        r = a.shape[0] // experts
        if how == "neighbour":  # every expert's A block moved to the next expert
            tensors[f"{where}.lora_A.weight"] = a.reshape(experts, r, -1).roll(1, 0).reshape(a.shape).contiguous()
        else:  # B's columns expert-major (e*r + k) where PEFT reads rank-major (k*E + e)
            tensors[f"{where}.lora_B.weight"] = b.reshape(b.shape[0], r, experts).transpose(1, 2).reshape(b.shape).contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two runs (an MoE run with a subset of experts and per-group ranks; a dense run), their exports, two
    broken copies, and a run on DeepSeek-V3 as released (FP8) exported and its base converted as the export
    printed: all loaded in one stock-PEFT process."""
    tmp = tmp_path_factory.mktemp("peft")
    moe = make_run(tmp, "builtin:tiny-deepseek-v3", MOE_ADAPTER, {1: [0, 3], 2: [5]})
    dense = make_run(tmp, "builtin:tiny-deepseek-llm",
                     AdapterSection(r=4, alpha=8, attention={"r": 8, "alpha": 32}, dense_mlp={"r": 2, "alpha": 4}), {}, seed=1)
    exports = {}
    for name, run, base in (("moe", moe, "builtin:tiny-deepseek-v3"), ("dense", dense, "builtin:tiny-deepseek-llm")):
        export(resolve(run, None), tmp / f"{name}-peft", "peft")
        exports[name] = {"base": str(resolve_model_path(base)), "adapter": str(tmp / f"{name}-peft")}
    for how in ("neighbour", "interleave"):
        exports[how] = {**exports["moe"], "adapter": str(_broken(tmp / "moe-peft", tmp / f"{how}-peft", how))}
    (tmp / "fp8").mkdir()
    fp8 = _fp8_as_printed(tmp / "fp8")
    exports |= fp8.pop("jobs")
    jobs = tmp / "jobs.json"
    jobs.write_text(json.dumps({"ids": IDS.tolist(), "exports": exports, "out": str(tmp / "out.pt")}))
    done = subprocess.run([sys.executable, str(HERE / "peft_load.py"), str(jobs)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"tmp": tmp, "runs": {"moe": moe, "dense": dense}, "out": torch.load(tmp / "out.pt"), "fp8": fp8}


def _fp8_as_printed(tmp: Path) -> dict:
    """DeepSeek-V3 as released, a run on it, its PEFT export and the base converted by the `dsft convert` line the
    export printed: the outputs, and the stock-PEFT jobs (`printed`: the load line as printed; `naive`: the FP8
    base loaded as it is)."""
    import re

    from typer.testing import CliRunner

    from conftest import released_v3
    from dsft.cli.app import app

    cli = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    v3 = released_v3(tmp)
    run = make_run(tmp, v3, MOE_ADAPTER, {1: [0, 3], 2: [5]})
    out = tmp / "v3-peft"
    exported = cli("export", "--adapter", run, "--format", "peft", "--out", out)
    convert = re.search(r"dsft convert --model (\S+) --out (\S+)", exported.output)
    load = re.search(r'PeftModel\.from_pretrained\(AutoModelForCausalLM\.from_pretrained\("([^"]+)"\), "([^"]+)"\)',
                     exported.output)
    converted = cli("convert", "--model", convert.group(1), "--out", convert.group(2), "--dtype", "float32") \
        if convert else None
    jobs = {"printed": {"base": load.group(1), "adapter": load.group(2)},
            "naive": {"base": str(v3), "adapter": load.group(2), "may_fail": True}} if load else {}
    return {"v3": v3, "run": run, "out": out, "exported": exported, "convert": convert, "load": load,
            "converted": converted, "jobs": jobs}


@pytest.mark.parametrize("name,base", [("moe", "builtin:tiny-deepseek-v3"), ("dense", "builtin:tiny-deepseek-llm")])
def test_stock_peft_loads_the_export_with_dsfts_logits(loaded: dict, name: str, base: str) -> None:
    want = _dsft_logits(loaded["runs"][name], base)
    got = loaded["out"][name]["logits"]
    with torch.no_grad():
        plain = _base(base)(IDS).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    written = json.loads((loaded["tmp"] / f"{name}-peft" / "adapter_config.json").read_text())
    after = loaded["out"][name]["config"]
    # PEFT rewrote nothing on load (a list of 20+ modules it may write as its shortest equivalent suffixes,
    # which select the same modules: the wrapped modules are compared too)
    assert after["target_modules"] == sorted(written["target_modules"]) or len(written["target_modules"]) >= 20
    assert after["wrapped_modules"] == sorted(written["target_modules"])
    assert after["target_parameters"] == sorted(written["target_parameters"])
    assert after["rank_pattern"] == written["rank_pattern"] and after["alpha_pattern"] == written["alpha_pattern"]
    # PEFT warns about exactly the pattern keys the export's record (and the printed load line) owns up to
    record = json.loads((loaded["tmp"] / f"{name}-peft" / "dsft-export.json").read_text())
    assert len(loaded["out"][name]["unmatched_pattern_keys"]) == record["pattern_keys_peft_warns_about"]
    if name == "moe":
        assert not any(m.endswith(("gate_proj", "up_proj", "down_proj")) for m in written["target_modules"])
        assert f"{EXPERTS.removeprefix('base_model.model.')}.gate_up_proj" in written["target_parameters"]
        assert {written["r"], *written["rank_pattern"].values()} == {8, 4, 2, 6}  # attention, shared, dense_mlp, routed
    else:
        assert written["target_parameters"] == [] and any(m.endswith(".gate_proj") for m in written["target_modules"])


@pytest.mark.parametrize("how", ["neighbour", "interleave"])
def test_a_broken_expert_layout_gives_other_logits(loaded: dict, how: str) -> None:
    want = _dsft_logits(loaded["runs"]["moe"], "builtin:tiny-deepseek-v3")
    assert (loaded["out"][how]["logits"] - want).abs().max() > 1e-3


def test_unselected_experts_are_zero_blocks(loaded: dict) -> None:
    t = load_file(loaded["tmp"] / "moe-peft" / "adapter_model.safetensors")
    a = t[f"{EXPERTS}.base_layer.lora_A.weight"].reshape(8, 6, -1)
    b = t[f"{EXPERTS}.base_layer.lora_B.weight"].reshape(-1, 6, 8)
    chosen = [e for e in range(8) if a[e].any()]
    assert chosen == [0, 3] and [e for e in range(8) if b[:, :, e].any()] == [0, 3]


def test_the_exports_check_refuses_names_peft_would_not_read(loaded: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, cli) -> None:
    from dsft.export import peft

    build = peft.build

    def misnamed(adapter, config, base):  # gate_up on the outer wrapper's names, as a naive writer would
        tensors, cfg, facts = build(adapter, config, base)
        inner = {k: v for k, v in tensors.items() if ".experts.base_layer." in k}
        for k in inner:
            tensors[k.replace(".experts.base_layer.", ".experts.gate_up_proj.")] = tensors.pop(k)
        return tensors, cfg, facts

    monkeypatch.setattr(peft, "build", misnamed)
    result = cli("export", "--adapter", loaded["runs"]["moe"], "--format", "peft", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "PEFT expects this tensor and the export lacks it" in result.output
    assert not (tmp_path / "x").exists()


def test_what_peft_cannot_hold_is_refused(tmp_path: Path, cli) -> None:
    router = make_run(tmp_path, "builtin:tiny-deepseek-v3", AdapterSection(r=4, alpha=8, router="trainable"), {}, seed=1)
    result = cli("export", "--adapter", router, "--format", "peft", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "(adapter.router: trainable), which a PEFT LoRA adapter cannot hold" in result.output
    assert "dsft merge" in result.output and not (tmp_path / "a").exists()
    result = cli("export", "--adapter", router, "--format", "tgi", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "--format: must be one of vllm, peft (got 'tgi')" in result.output


def test_uniform_ranks_give_no_pattern_and_peft_no_warning(tmp_path: Path) -> None:
    """One rank and alpha everywhere: r / lora_alpha say it, no pattern is written, nothing for PEFT to warn about;
    per-group ranks: patterns only where a group differs from the parameters' most common rank."""
    from dsft.export.peft import patterns

    same = patterns({"a": 8, "b": 8, "c": 8}, {"a": 16.0, "b": 16.0, "c": 16.0}, {"b", "c"})
    assert same == {"r": 8, "lora_alpha": 16.0, "rank_pattern": {}, "alpha_pattern": {}}
    mixed = patterns({"attn": 8, "p1": 4, "p2": 4, "p3": 6}, {"attn": 4.0, "p1": 8.0, "p2": 8.0, "p3": 3.0}, {"p1", "p2", "p3"})
    assert (mixed["r"], mixed["lora_alpha"]) == (4, 8.0)
    assert mixed["rank_pattern"] == {"attn": 8, "p3": 6} and mixed["alpha_pattern"] == {"attn": 4.0, "p3": 3.0}


def test_an_fp8_base_loads_through_the_printed_recipe_with_dsfts_logits(loaded: dict,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSeek-V3 as released (FP8 e4m3 with partial edge blocks, an MTP layer, vocab padded, sharded): the export
    prints a recipe that dequantizes the base with `dsft convert`; run as printed, the load line (in a process
    that never imports dsft) gives dsft's logits. The naive load of the FP8 base is wrong in stock transformers
    (an error, or partial edge blocks mis-scaled), and the export's own check refuses a base config that still
    declares its quantization."""
    from dsft.export.peft import check

    fp8 = loaded["fp8"]
    v3, run, out, exported, convert, load = (fp8[k] for k in ("v3", "run", "out", "exported", "convert", "load"))
    assert exported.exit_code == 0, exported.output
    assert "the base is FP8 block-scaled" in exported.output
    assert convert and load and convert.group(1) == str(v3) and load.group(1) == convert.group(2), exported.output
    assert "--dtype float32" in exported.output  # the printed option for dsft's exact values
    assert fp8["converted"].exit_code == 0, fp8["converted"].output
    plain = Path(convert.group(2))
    config = json.loads((plain / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 1
    assert "model.layers.3.eh_proj.weight" in (plain / "model.safetensors.index.json").read_text()  # the MTP layer kept
    assert "_scale_inv" not in (plain / "model.safetensors.index.json").read_text()
    got = loaded["out"]
    want = _dsft_logits(run, str(v3))
    assert (got["printed"]["logits"] - want).abs().max() < 1e-4
    # the load the printed text warns against: it fails, or (measured here) mis-scales the partial edge block of
    # kv_a_proj_with_mqa without a word
    assert got["naive"].get("failed") or (got["naive"]["logits"] - want).abs().max() > 1e-3
    # the check builds the base as the recipe loads it: skipping the conversion is caught
    monkeypatch.setattr("dsft.export.peft.as_loaded", lambda config: config)
    problems = check(out, v3)
    assert problems and "quantization_config 'fp8'" in problems[0]
