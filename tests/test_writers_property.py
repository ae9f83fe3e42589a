"""Property: whatever the output path is (new, an empty directory, a user's directory, a file, an earlier
output of dsft's, a checkpoint, the command's own input), however it is reached (directly, through a link,
a dangling link, a linked parent, a link loop) and with or without --force, no writer (merge, export,
convert) changes a byte of anything it did not write, never deletes through a link, never leaves a hidden
staging directory, and either finishes at the resolved target or refuses in one line (exit 2).

The combinations cover every writer, output and route; --force is drawn from a fixed seed (each case's
values are its test id)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from test_bad_inputs import ckpt, run_copy

WRITERS = ("merge", "export", "convert")
TARGETS = ("new", "empty", "user-dir", "file", "earlier-output", "checkpoint", "input")
ROUTES = ("direct", "link", "dangling-link", "linked-parent", "loop")
RECORDS = {"merge": "dsft-merge.json", "export": "dsft-export.json", "convert": "dsft-convert.json"}


def _cases(seed: int = 23) -> list[tuple[str, str, str, bool]]:
    """Every writer x output x route (a dangling link only to a new path, one loop per writer), --force
    drawn at random for each, and the opposite --force for a random third of them."""
    rng = random.Random(seed)
    cases = []
    for writer in WRITERS:
        combos = [(t, r) for t in TARGETS for r in ("direct", "link", "linked-parent")] + [("new", "dangling-link"), ("new", "loop")]
        for target, route in combos:
            force = rng.random() < 0.5
            cases.append((writer, target, route, force))
            if rng.random() < 1 / 3:
                cases.append((writer, target, route, not force))
    return cases


def _state(root: Path) -> dict[str, str]:
    """Every entry under root: a link's target, a directory, a file's sha256 (links are not followed)."""
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[str(p)] = "dir"
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _release(root: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from dsft.models.load import resolve_model_path

    src, dst = resolve_model_path("builtin:tiny-deepseek-llm"), root / "release"
    dst.mkdir()
    torch.save(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict(), dst / "pytorch_model.bin")
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


def _argv(writer: str, run: Path, release: Path, out: Path, force: bool) -> list[Any]:
    head = {"merge": ["merge", "--adapter", run], "export": ["export", "--adapter", run],
            "convert": ["convert", "--model", release]}[writer]
    return [*head, "--out", out, *(["--force"] if force else [])]


@pytest.mark.parametrize("writer, target, route, force", _cases(), ids=lambda v: str(v))
def test_no_writer_changes_what_it_did_not_write(writer: str, target: str, route: str, force: bool, finished_run: Path,
                                                 tmp_path: Path, cli) -> None:
    root = tmp_path / "root"
    root.mkdir()
    run = run_copy(root, finished_run)
    release = _release(root) if writer == "convert" else root / "no-release"
    places = root / "places"
    places.mkdir()
    real = places / "out"
    if target == "empty":
        real.mkdir()
    elif target == "user-dir":
        (real / "sub").mkdir(parents=True)
        (real / "notes.txt").write_text("mine")
        (real / "sub/data.bin").write_bytes(os.urandom(64))
    elif target == "file":
        real.write_text("a user's file")
    elif target == "earlier-output":
        assert cli(*_argv(writer, run, release, real, False)).exit_code == 0
    elif target == "checkpoint":
        real = ckpt(places, "out")
    elif target == "input":
        real = release if writer == "convert" else run
    if route == "direct":
        out = real
    elif route == "loop":
        os.symlink(root / "loop-b", root / "loop-a")
        os.symlink(root / "loop-a", root / "loop-b")
        out = root / "loop-a"
    elif route == "linked-parent":
        os.symlink(real.parent, root / "via")
        out = root / "via" / real.name
    else:
        os.symlink(real, root / "link")
        out = root / "link"

    before = _state(root)
    dsft_output = {k for k in before if k == str(real) or k.startswith(str(real) + os.sep)} \
        if target == "earlier-output" else set()
    result = cli(*_argv(writer, run, release, out, force))
    after = _state(root)

    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output and result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        assert len(errors) == 1, result.output
        assert after == before, "a refused command changed files"
    else:
        assert target in ("new", "empty", "earlier-output"), f"wrote over a {target}: {result.output}"
        assert target != "earlier-output" or force, "replaced an earlier output without --force"
        written = real.resolve() if route != "linked-parent" else (root / "via").resolve() / real.name
        assert (written / RECORDS[writer]).is_file()
        changed = {k for k in before if after.get(k) != before[k]}
        assert changed <= dsft_output | {str(real)}, f"changed what dsft did not write: {sorted(changed - dsft_output)[:3]}"
    assert [k for k in before if before[k].startswith("link:") and after.get(k) != before[k]] == [], "a link was removed"
    assert not [k for k in after if ".dsft-partial" in k or ".dsft-old-" in k], "a staging directory was left behind"
