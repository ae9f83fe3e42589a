"""`dsft convert`: a `.bin`-only release becomes a safetensors checkpoint dsft trains on; a pickle holding
anything but tensors is refused and never run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from dsft.models.load import resolve_model_path
from test_bad_inputs import _snapshot, refused


def _bin_release(tmp: Path) -> Path:
    """The tiny DeepSeek LLM as older releases ship it: two pytorch_model-*.bin shards and their index."""
    src, dst = resolve_model_path("builtin:tiny-deepseek-llm"), tmp / "bin-release"
    dst.mkdir()
    state = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, dst / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


def test_a_bin_release_is_refused_with_the_convert_command_then_converts_and_trains(tmp_path: Path, cli, make_recipe) -> None:
    release = _bin_release(tmp_path)
    recipe = make_recipe(model={"path": str(release)}, training={"max_steps": 2})
    refused(cli("sft", "--recipe", recipe), f"convert them with `dsft convert --model {release}")
    out = tmp_path / "converted"
    result = cli("convert", "--model", release, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00002.safetensors",
                                                                  "model-00002-of-00002.safetensors"]
    ids = torch.arange(3, 30).unsqueeze(0)
    ref = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-deepseek-llm"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits, ref(ids).logits)
    assert cli("sft", "--recipe", make_recipe(model={"path": str(out)}, training={"max_steps": 2})).exit_code == 0
    again = cli("convert", "--model", release, "--out", out)
    refused(again, "already exists; pass --force")
    assert cli("convert", "--model", release, "--out", out, "--force").exit_code == 0


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dsft-pwned",))


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path: Path, cli) -> None:
    release = tmp_path / "evil"
    release.mkdir()
    shutil.copy(resolve_model_path("builtin:tiny-deepseek-llm") / "config.json", release / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload()}, release / "pytorch_model.bin")
    before = _snapshot(tmp_path)
    refused(cli("convert", "--model", release, "--out", tmp_path / "out"), "pytorch_model.bin: not a plain tensor file")
    assert not Path("/tmp/dsft-pwned").exists() and _snapshot(tmp_path) == before


def test_convert_refuses_to_write_into_its_input_or_a_users_directory(tmp_path: Path, cli) -> None:
    release = _bin_release(tmp_path)
    refused(cli("convert", "--model", release, "--out", release / "st"), "is inside the model checkpoint")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("mine")
    refused(cli("convert", "--model", release, "--out", tmp_path / "mine", "--force"), "holds files dsft did not write")
    refused(cli("convert", "--model", release, "--out", tmp_path), "contains the checkpoint (--model)")
