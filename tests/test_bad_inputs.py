"""Bad input in every command, table-driven and in-process: exit code 2, one `error:` line naming the
file / row / key / option, no traceback, and the whole temporary root (inputs, output parents and
DSFT_CACHE) byte for byte as it was. The overwrite cases (`--force` onto a base, a run, a user's
directory) are here too: refused, nothing replaced. Every row is listed in docs/errors.md.

The cases share one finished tiny run and the built-in checkpoint (session-scoped); a case copies
what it damages into its own root.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, legal_rows, released_v3, write_jsonl
from dsft.data.store import data_root

PAIR = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}


# ---------------------------------------------------------------- shared inputs

def _base_recipe(root: Path) -> dict[str, Any]:
    train = root / "train.jsonl"
    if not train.exists():
        write_jsonl(train, legal_rows(4))
    return {"model": {"path": "builtin:tiny-deepseek-v3", "dtype": "float32"},
            "data": {"train": str(train), "max_length": 128}, "training": {"max_steps": 1},
            "output_dir": str(root / "run")}


def _deep(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _deep(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe(root: Path, changes: dict | None = None, name: str = "recipe.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(_deep(_base_recipe(root), changes or {})))
    return path


def text_recipe(root: Path, text: str | bytes) -> Path:
    _base_recipe(root)
    path = root / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def sft(changes: dict | None = None, *extra: str) -> Callable[[Path], list]:
    return lambda root: ["sft", "--recipe", recipe(root, changes), *extra]


def pref(root: Path, rows: list | None = None, raw: bytes | None = None) -> dict:
    path = root / "pairs.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        write_jsonl(path, rows or [PAIR, PAIR])
    return {"data": {"train": str(path), "format": "preference", "max_length": 256}}


def ckpt(root: Path, name: str = "ckpt", model: str = "tiny-deepseek-v3") -> Path:
    from dsft.models.load import resolve_model_path

    dst = root / name
    shutil.copytree(resolve_model_path(f"builtin:{model}"), dst)
    return dst


def edit_config(path: Path, drop: tuple[str, ...] = (), **values: Any) -> Path:
    config = json.loads((path / "config.json").read_text())
    config = {k: v for k, v in {**config, **values}.items() if k not in drop}
    (path / "config.json").write_text(json.dumps(config))
    return path


def edit_weights(path: Path, change: Callable[[dict], None]) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def saved_before_metadata(checkpoint: Path) -> Path:
    """A checkpoint as a dsft before 2026-12-07 saved it: complete, without dsft_adapter.json."""
    (checkpoint / "dsft_adapter.json").unlink()
    marker = checkpoint / "dsft-complete.json"
    data = json.loads(marker.read_text())
    data["files"].pop("dsft_adapter.json")
    marker.write_text(json.dumps(data))
    return checkpoint


def truncate(path: Path, by: int = 100) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:-by])
    return path


def with_model(damage: Callable[[Path], Any], command: str = "sft") -> Callable[[Path], list]:
    def setup(root: Path) -> list:
        model = ckpt(root)
        damage(model)
        return [command, "--recipe", recipe(root, {"model": {"path": str(model)}})]
    return setup


def run_copy(root: Path, source: Path) -> Path:
    """The finished run copied to ROOT/run, its recorded output_dir pointing at the copy."""
    dst = root / "run"
    shutil.copytree(source, dst)
    data = yaml.safe_load((dst / "recipe.yaml").read_text())
    (dst / "recipe.yaml").write_text(yaml.safe_dump({**data, "output_dir": str(dst)}, sort_keys=False))
    return dst


def with_run(damage: Callable[[Path, Path], Any], *command: str) -> Callable[[Path, Path], list]:
    """A copy of the finished run, damaged, then `command` with the damage's extra args (and `--adapter RUN`
    for the commands that read a run)."""
    def setup(root: Path, source: Path) -> list:
        run = run_copy(root, source)
        extra = damage(run, root) or []
        return [*command, *extra] if command[0] in ("sft", "dpo") else [*command, "--adapter", run, *extra]
    setup.needs_run = True  # type: ignore[attr-defined]
    return setup


def status(value: str) -> Callable[[Path, Path], None]:
    def damage(run: Path, root: Path) -> None:
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, "status": value}))
    return damage


def recipe_base(path_of: Callable[[Path], Path]) -> Callable[[Path, Path], None]:
    """Point the run's recorded model.path at another directory."""
    def damage(run: Path, root: Path) -> None:
        data = yaml.safe_load((run / "recipe.yaml").read_text())
        data["model"]["path"] = str(path_of(root))
        (run / "recipe.yaml").write_text(yaml.safe_dump(data))
    return damage


def merge_into(out: Callable[[Path, Path], Path], *extra: str, base: Callable[[Path], Path] | None = None):
    def setup(root: Path, source: Path) -> list:
        run = run_copy(root, source)
        args = ["merge", "--adapter", run, "--out", out(root, run), *extra]
        return [*args, "--base", base(root)] if base else args
    setup.needs_run = True  # type: ignore[attr-defined]
    return setup


def export_into(out: Callable[[Path, Path], Path], *extra: str, damage: Callable[[Path, Path], Any] | None = None):
    def setup(root: Path, source: Path) -> list:
        run = run_copy(root, source)
        if damage:
            damage(run, root)
        return ["export", "--adapter", run, "--out", out(root, run), *extra]
    setup.needs_run = True  # type: ignore[attr-defined]
    return setup


def _router_run(root: Path) -> Path:
    """A run whose adapter trains the router whole (adapter.router: trainable)."""
    from dsft.config.schema import AdapterSection
    from test_merge import make_run

    return make_run(root, "builtin:tiny-deepseek-v3", AdapterSection(r=4, alpha=8, router="trainable"), {}, seed=1)


def merge_damaged(damage: Callable[[Path, Path], Any]):
    def setup(root: Path, source: Path) -> list:
        run = run_copy(root, source)
        extra = damage(run, root) or []
        return ["merge", "--adapter", run, "--out", root / "merged", *extra]
    setup.needs_run = True  # type: ignore[attr-defined]
    return setup


def deny(monkeypatch: pytest.MonkeyPatch, under: Path, code: int) -> None:
    """Every write under `under` fails with `code` (CI runs as root: permission bits do not stop it)."""
    under = Path(os.path.abspath(under))

    def blocked(path: Any) -> bool:
        try:
            p = Path(os.path.abspath(os.fspath(path)))
        except TypeError:
            return False
        return p == under or under in p.parents

    def fail(path: Any) -> OSError:
        return OSError(code, os.strerror(code), str(path))

    real_mkdir, real_open, real_bopen, real_replace = os.mkdir, os.open, builtins.open, os.replace

    def mkdir(path: Any, *a: Any, **k: Any) -> None:
        if blocked(path):
            raise fail(path)
        real_mkdir(path, *a, **k)

    def os_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
            raise fail(path)
        return real_open(path, flags, *a, **k)

    def b_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if any(c in mode for c in "wax+") and blocked(file):
            raise fail(file)
        return real_bopen(file, mode, *a, **k)

    def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        if blocked(dst):
            raise fail(dst)
        real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", b_open)
    monkeypatch.setattr(io, "open", b_open)
    monkeypatch.setattr(os, "replace", replace)


def no_disk(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6, 1000))


# ---------------------------------------------------------------- rules: what a reader trusts, what a writer resolves

_HELD: list[Any] = []  # locks held by a case's patch while its command runs


def edit_json(path: Path, change: Callable[[dict], Any]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def meta(change: Callable[[dict], Any]) -> Callable[[Path, Path], None]:
    """Edit the run's adapter/dsft_adapter.json."""
    return lambda run, r: edit_json(run / "adapter/dsft_adapter.json", change)


def adapter_cfg(change: Callable[[dict], Any]) -> Callable[[Path, Path], None]:
    """Edit the run's adapter/adapter_config.json."""
    return lambda run, r: edit_json(run / "adapter/adapter_config.json", change)


def lora(key: str, value: float) -> Callable[..., None]:
    """Put `value` (NaN, inf) into one element of LoRA tensor `key` of the run's adapter (or, given
    `adapter=""`, of the adapter weights directly in the first argument: a checkpoint)."""
    def damage(run: Path, r: Path, adapter: str = "adapter") -> None:
        from safetensors.torch import load_file, save_file

        path = run / adapter / "adapter_model.safetensors"
        tensors = load_file(path)
        tensors[key].view(-1)[0] = value
        save_file(tensors, path, metadata={"format": "pt"})
    return damage


LORA_B = "base_model.model.model.layers.1.self_attn.q_a_proj.lora_B.weight"


def other_weights(root: Path) -> Path:
    """The built-in checkpoint's files with one weight changed: the same config, other weights."""
    return edit_weights(ckpt(root, "other"), lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"] + 1))


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    return path


def loop(root: Path) -> Path:
    link(root / "loop-b", root / "loop-a")
    return link(root / "loop-a", root / "loop-b")


def trained_on(run: Path) -> str:
    return yaml.safe_load((run / "recipe.yaml").read_text())["data"]["train"][0]


def data_changed(run: Path, r: Path) -> list:
    """The run's recorded training file is a copy in ROOT, which then gains a row."""
    copy = write(r / "train2.jsonl", Path(trained_on(run)).read_bytes())
    data = yaml.safe_load((run / "recipe.yaml").read_text())
    data["data"]["train"] = [str(copy)]
    (run / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    edit_json(run / "run.json", lambda info: info.update(status="interrupted", data_sha256={
        str(copy): hashlib.sha256(copy.read_bytes()).hexdigest()}))
    with copy.open("a") as f:
        f.write(json.dumps(legal_rows(1)[0]) + "\n")
    return ["--recipe", run / "recipe.yaml", "--resume"]


def reports_to_tensorboard(run: Path, r: Path) -> list:
    """The run's recipe reports to TensorBoard, and the user keeps notes in RUN/tensorboard/."""
    data = yaml.safe_load((run / "recipe.yaml").read_text())
    data["training"]["report_to"] = ["tensorboard"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    write(run / "tensorboard/notes.txt", "my notes on these curves")
    return ["--force", "--recipe", recipe(r, {"output_dir": str(run), "training": {"report_to": ["tensorboard"]}})]


def feedback(root: Path, rows: list) -> dict:
    """A KTO recipe's sections over `rows` (data.format: kto)."""
    return {"data": {"train": str(write_jsonl(root / "feedback.jsonl", rows)), "format": "kto", "max_length": 128},
            "kto": {"max_prompt_length": 64}, "training": {"micro_batch_size": 2}}


PROMPT = {"prompt": "What is 2 + 2?", "answer": "4"}


def prompts(root: Path, rows: list | None = None, rewards: list | None = None, **grpo: Any) -> dict:
    """A GRPO recipe's sections over `rows` (data.format: prompt) with `rewards` (default: think_format)."""
    return {"data": {"train": str(write_jsonl(root / "prompts.jsonl", rows or [PROMPT, PROMPT])), "format": "prompt",
                     "max_length": 128},
            "grpo": {"max_prompt_length": 64, "max_completion_length": 8, "num_generations": 2,
                     "rewards": rewards or [{"builtin": "think_format"}], **grpo},
            "training": {"micro_batch_size": 2}}


def reward_file(root: Path, body: str) -> list:
    """`rewards` naming the function `f` of a file holding `body`."""
    path = write(root / "rewards.py", body)
    return [{"function": f"{path}:f"}]


def grpo_reward(body: str) -> Callable[[Path], list]:
    """`dsft grpo` on the prompt rows with the user's reward `f` defined by `body`."""
    return lambda r: ["grpo", "--recipe", recipe(r, prompts(r, rewards=reward_file(r, body)))]


def no_experimental(mp: pytest.MonkeyPatch) -> None:
    """An installed TRL without trl.experimental."""
    import importlib

    from dsft.train import experimental

    real = importlib.import_module
    mp.setattr(experimental.importlib, "import_module",
               lambda name, *a: (_ for _ in ()).throw(ImportError(f"No module named {name!r}")) if name.startswith(
                   "trl.experimental") else real(name, *a))


def full_cache(mp: pytest.MonkeyPatch) -> None:
    """The disk fills while a prepared-data entry is written (its lock and temporary directory are made)."""
    import pyarrow as pa

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(os.environ["DSFT_CACHE"]) / "data"))

    mp.setattr(pa.ipc, "new_stream", full)


def needs_run(setup: Callable[[Path, Path], list]) -> Callable[[Path, Path], list]:
    setup.needs_run = True  # type: ignore[attr-defined]
    return setup


def hold(path: Path) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """A patch that holds PATH's lock (another dsft process writing there) while the command runs."""
    def patch(mp: pytest.MonkeyPatch, r: Path) -> None:
        import fcntl

        handle = open(path if path.is_absolute() else r / path, "a")  # noqa: SIM115 - held by _HELD
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD.append(handle)
    return patch


def bin_release(root: Path, shards: dict[str, dict[str, Any]], index: bool = True) -> Path:
    """A `.bin` release of tiny tensors: SHARDS maps a file name to its tensors (None: the file is missing)."""
    import torch

    release = root / "bin"
    release.mkdir()
    write(release / "config.json", (ckpt(root) / "config.json").read_bytes())
    weight_map = {}
    for name, tensors in shards.items():
        if tensors is not None:
            torch.save({k: torch.zeros(2) for k in tensors}, release / name)
        weight_map.update(dict.fromkeys(tensors or [f"missing.{name}"], name))
    if index:
        write(release / "pytorch_model.bin.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))
    return release


BOMB = "\n".join(['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
                  *(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)), "model: {path: *a9}"]) + "\n"


# ---------------------------------------------------------------- the table
# (id, setup: root -> argv (or (root, finished run) -> argv), expected text in the one error line,
#  optional patch: (monkeypatch, root) -> None applied before the command runs)

TINY_V3_ATTN = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"

CASES: list[tuple[str, Any, str, Any]] = [
    # recipe files and --set
    ("recipe-not-utf8", lambda r: ["validate", text_recipe(r, b"model:\n  path: \xff\n")], "recipe.yaml: not UTF-8 text", None),
    ("recipe-duplicate-key", lambda r: ["validate", text_recipe(
        r, f"model: {{path: 'builtin:tiny-deepseek-v3'}}\ndata: {{train: {r / 'train.jsonl'}}}\noutput_dir: {r / 'run'}\n"
           "training:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")], "recipe.yaml:6: not valid YAML (duplicate key 'lr'", None),
    ("recipe-not-found", lambda r: ["validate", r / "nope.yaml"], "nope.yaml: recipe file not found", None),
    ("recipe-not-mapping", lambda r: ["validate", text_recipe(r, "- a\n- b\n")], "a recipe is a YAML mapping", None),
    ("recipe-bad-yaml", lambda r: ["sft", "--recipe", text_recipe(r, "model: [\n")], "recipe.yaml:2: not valid YAML", None),
    ("set-bad-yaml-list", sft(None, "--set", "data.train=[a.jsonl, b.jsonl"),
     "--set 'data.train=[a.jsonl, b.jsonl': the value is not valid YAML", None),
    ("set-bad-yaml-mapping", sft(None, "--set", "training.lr=a: b: c"), "--set 'training.lr=a: b: c': the value is not valid YAML", None),
    ("set-no-equals", sft(None, "--set", "training.lr"), "--set 'training.lr': write it as section.key=value", None),
    ("set-into-scalar", sft(None, "--set", "output_dir.x=1"), "--set 'output_dir.x=1': output_dir is not a section", None),
    ("set-inf-int", sft(None, "--set", "training.max_steps=.inf"),
     "--set training.max_steps=.inf: training.max_steps: must be an integer (got inf)", None),
    ("set-empty-output-dir", sft(None, "--set", "output_dir="), "--set output_dir=: output_dir: empty; give the run directory", None),
    ("lr-inf", lambda r: ["validate", recipe(r, {"training": {"lr": float("inf")}})], "training.lr: must be a finite number (got inf)", None),
    ("epochs-nan", lambda r: ["validate", recipe(r, {"training": {"epochs": float("nan")}})], "training.epochs: must be a finite number", None),
    ("beta-inf", lambda r: ["validate", recipe(r, {**pref(r), "dpo": {"beta": float("inf")}})], "dpo.beta: must be a finite number", None),
    ("max-length-true", lambda r: ["validate", recipe(r, {"data": {"max_length": True}})], "data.max_length: must be an integer (got True)", None),
    ("model-path-empty", lambda r: ["validate", recipe(r, {"model": {"path": " "}})], "model.path: empty; give a checkpoint directory", None),
    ("chat-template-missing", lambda r: ["sft", "--recipe", recipe(r, {"data": {"chat_template": str(r / "nope.jinja")}})],
     "data.chat_template: file not found", None),
    ("eval-file-missing", lambda r: ["sft", "--recipe", recipe(r, {"data": {"eval": [str(r / "held.jsonl")]}})],
     "data.eval: file not found", None),
    # data files
    ("jsonl-not-utf8", lambda r: ["sft", "--recipe", recipe(r, {"data": {"train": str(write(
        r / "d.jsonl", json.dumps(legal_rows(1)[0]).encode() + b"\n{\"messages\": \"\xff\"}\n"))}})], "d.jsonl:2: not UTF-8 text", None),
    ("csv-not-utf8", lambda r: ["sft", "--recipe", recipe(r, {"data": {"format": "prompt_completion", "train": str(write(
        r / "d.csv", b"prompt,completion\nQ?,A.\nQ\xe9?,B.\n"))}})], "d.csv:3: not UTF-8 text", None),
    ("parquet-corrupt", lambda r: ["sft", "--recipe", recipe(r, {"data": {"train": str(write(r / "d.parquet", b"PAR1 not really"))}})],
     "d.parquet: not a readable Parquet file", None),
    ("chat-template-syntax", lambda r: ["sft", "--recipe", recipe(r, {"data": {"chat_template": str(write(
        r / "tpl.jinja", "{% for m in messages %}\n{{ m.content }\n{% endfor %}"))}})], "tpl.jinja:2: the chat template is not valid Jinja", None),
    ("chat-template-not-utf8", lambda r: ["sft", "--recipe", recipe(r, {"data": {"chat_template": str(write(r / "tpl.jinja", b"\xff{{ x }}"))}})],
     "tpl.jinja: not UTF-8 text", None),
    ("early-stopping-no-eval", lambda r: ["validate", recipe(r, {"training": {"early_stopping": {"patience": 2}}})],
     "training.early_stopping watches the held-out loss: it needs data.eval and training.eval_steps", None),
    ("optimizer-8bit-on-cpu", sft({"training": {"optimizer": "adamw_8bit"}}),
     "training.optimizer: adamw_8bit (bitsandbytes' 8-bit optimizer states) needs a CUDA GPU and this machine has none; use adamw here", None),
    ("optimizer-unknown", lambda r: ["validate", recipe(r, {"training": {"optimizer": "lion"}})], "training.optimizer:", None),
    ("sharegpt-unknown-speaker", lambda r: ["sft", "--recipe", recipe(r, {"data": {"format": "sharegpt", "train": str(write_jsonl(
        r / "share.jsonl", [{"conversations": [{"from": "human", "value": "Q?"}, {"from": "tool", "value": "x"}]}]))}})],
     "share.jsonl:1: conversations[1]: from 'tool' is not a speaker dsft knows", None),
    ("sharegpt-no-conversations", lambda r: ["sft", "--recipe", recipe(r, {"data": {"format": "sharegpt", "train": str(write_jsonl(
        r / "share.jsonl", [{"text": "Q?"}]))}})],
     "share.jsonl:1: missing field 'conversations' (data.format is sharegpt", None),
    ("mix-weight-zero", lambda r: ["validate", recipe(r, {"data": {"train": [{"path": str(r / "train.jsonl"), "weight": 0}]}})],
     "data.train[0].weight: a positive number (got 0)", None),
    ("mix-both-shares", lambda r: ["validate", recipe(r, {"data": {"train": [{"path": str(r / "train.jsonl"), "weight": 1, "rows": 2}]}})],
     "data.train[0]: give weight (a share of the mix) or rows (a count), not both", None),
    ("mix-key-written", lambda r: ["validate", recipe(r, {"data": {"mix": [None]}})],
     "data.mix: not a key to write; give a file's share, format or columns in its data.train entry", None),
    ("set-typo-key", sft(None, "--set", "traning.lr=1e-3"), "--set traning.lr=1e-3: traning: unknown key; did you mean training?", None),
    ("recipe-typo-section", lambda r: ["validate", recipe(r, {"adaptor": {"r": 4}})], "recipe.yaml: adaptor: unknown key; did you mean adapter?", None),
    ("csv-header-other-format", lambda r: ["sft", "--recipe", recipe(r, {"data": {"format": "alpaca", "train": str(write(
        r / "d.csv", "prompt,completion\nQ?,A.\n"))}})],
     "d.csv:1: the header has columns prompt, completion; data.format alpaca needs instruction, output (missing instruction, "
     "output); these columns fit data.format prompt_completion", None),
    ("csv-messages", lambda r: ["sft", "--recipe", recipe(r, {"data": {"train": str(write(r / "d.csv", "prompt,completion\nQ?,A.\n"))}})],
     "d.csv: CSV cannot hold messages rows (a list of turns per row); use JSONL or Parquet", None),
    ("rows-fit-other-format", lambda r: ["sft", "--recipe", recipe(r, {"data": {"format": "alpaca", "train": str(write_jsonl(
        r / "p.jsonl", [{"prompt": "Q?", "completion": "A."}]))}})],
     "p.jsonl:1: missing field 'instruction'; the row has the fields of prompt_completion: set data.format: prompt_completion", None),
    ("field-empty", lambda r: ["sft", "--recipe", recipe(r, {"data": {"format": "prompt_completion", "train": str(write_jsonl(
        r / "p.jsonl", [{"prompt": "Q?", "completion": ""}]))}})], "p.jsonl:1: field 'completion' is empty", None),
    ("recipe-twice", lambda r: ["sft", recipe(r), "--recipe", recipe(r, name="other.yaml")], "--recipe: given twice", None),
    ("max-length-drops-rows", sft({"data": {"max_length": 8}}), "data.max_length 8: 4 of 4 rows lose every loss token", None),
    ("pairs-not-utf8", lambda r: ["dpo", "--recipe", recipe(r, pref(r, raw=b'{"prompt": "\xff"}\n'))], "pairs.jsonl:1: not UTF-8 text", None),
    # model directories
    ("config-json-list", with_model(lambda m: write(m / "config.json", "[1, 2]")), "config.json must be a JSON object, got list", None),
    ("config-not-json", with_model(lambda m: write(m / "config.json", "{oops")), "config.json is not readable JSON", None),
    ("config-no-layers", with_model(lambda m: edit_config(m, drop=("num_hidden_layers",))), "config.json: missing num_hidden_layers", None),
    ("index-json-list", with_model(lambda m: write(m / "model.safetensors.index.json", "[]")),
     "model.safetensors.index.json must be a JSON object", None),
    ("index-no-weight-map", with_model(lambda m: write(m / "model.safetensors.index.json", '{"metadata": {}}')),
     "model.safetensors.index.json has no weight_map", None),
    ("tokenizer-not-json", with_model(lambda m: write(m / "tokenizer.json", "garbage")), "tokenizer.json is not readable JSON", None),
    ("tokenizer-unreadable", with_model(lambda m: write(m / "tokenizer.json", '{"model": {"type": "Nope"}}')),
     "the tokenizer files cannot be read", None),
    ("shard-truncated", with_model(lambda m: truncate(m / "model.safetensors")), "model.safetensors is truncated", None),
    ("shard-not-safetensors", with_model(lambda m: write(m / "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")),
     "model.safetensors is not a safetensors file", None),
    ("shard-transposed", with_model(lambda m: edit_weights(m, lambda t: t.__setitem__(TINY_V3_ATTN, t[TINY_V3_ATTN].T.contiguous()))),
     f"{TINY_V3_ATTN} is [64, 40], config.json implies [40, 64]", None),
    ("shard-int-dtype", with_model(lambda m: edit_weights(m, lambda t: t.__setitem__(
        "model.norm.weight", t["model.norm.weight"].to(__import__("torch").int32)))),
     "model.norm.weight is stored as I32, config.json implies a floating-point weight", None),
    ("shard-missing-tensor", with_model(lambda m: edit_weights(m, lambda t: t.pop("model.norm.weight"))), "no tensor model.norm.weight", None),
    ("shard-extra-tensor", with_model(lambda m: edit_weights(m, lambda t: t.__setitem__(
        "model.extra.weight", __import__("torch").zeros(2)))), "tensor model.extra.weight is not part of this model", None),
    ("shard-expert-index", with_model(lambda m: edit_weights(m, lambda t: t.__setitem__(
        "model.layers.1.mlp.experts.8.gate_proj.weight", t.pop("model.layers.1.mlp.experts.7.gate_proj.weight")))),
     "expert 8, but config.json gives 8 experts per layer", None),
    ("model-pickle-only", with_model(lambda m: (m / "model.safetensors").rename(m / "pytorch_model.bin")),
     "holds only pickle weights (pytorch_model.bin)", None),
    ("quantization-unsupported", with_model(lambda m: edit_config(m, quantization_config={"quant_method": "gptq"})),
     "quantization_config 'gptq' is not supported", None),
    ("fp8-without-scale", with_model(lambda m: (edit_config(m, quantization_config={"quant_method": "fp8", "weight_block_size": [32, 32]}),
                                                edit_weights(m, lambda t: t.__setitem__(TINY_V3_ATTN, t[TINY_V3_ATTN].to(
                                                    __import__("torch").float8_e4m3fn))))),
     f"{TINY_V3_ATTN} is FP8 without a {TINY_V3_ATTN}_scale_inv", None),
    # output directories of sft / dpo: never an input, never a checkpoint, never a user's files
    ("output-inside-model", lambda r: ["sft", "--recipe", recipe(r, {"model": {"path": str(ckpt(r))}, "output_dir": str(r / "ckpt/run")})],
     "output_dir: " + "{root}/ckpt/run is inside the model checkpoint", None),
    ("output-is-model-force", lambda r: ["sft", "--force", "--recipe", recipe(r, {"model": {"path": str(ckpt(r))}, "output_dir": str(r / "ckpt")})],
     "is the base model (model.path); dsft never writes over its inputs", None),
    ("output-contains-data-force", lambda r: ["sft", "--force", "--recipe", recipe(r, {"output_dir": str(r)})],
     "contains the data file", None),
    ("output-user-files-force", lambda r: (write(r / "mine/notes.txt", "my notes"), ["sft", "--force", "--recipe", recipe(
        r, {"output_dir": str(r / "mine")})])[1], "holds files dsft did not write (notes.txt); dsft replaces only its own runs", None),
    ("output-user-readme-force", with_run(lambda run, r: (write(run / "README.md", "# my notes on this run"), [
        "--force", "--recipe", recipe(r, {"output_dir": str(run)})])[1], "sft"),
     "holds files dsft did not write (README.md); dsft replaces only its own runs", None),
    ("output-user-wandb-force", with_run(lambda run, r: (write(run / "wandb/my-run.txt", "mine"), [
        "--force", "--recipe", recipe(r, {"output_dir": str(run)})])[1], "sft"),
     "holds files dsft did not write (wandb); dsft replaces only its own runs", None),
    ("output-parent-is-file", lambda r: (write(r / "afile", "x"), ["sft", "--recipe", recipe(r, {"output_dir": str(r / "afile/run")})])[1],
     "is a file, so", None),
    ("output-readonly", lambda r: (os.mkdir(r / "ro"), ["sft", "--recipe", recipe(r, {"output_dir": str(r / "ro/run")})])[1],
     "output_dir: cannot write in {root}/ro (Read-only file system)", lambda mp, r: deny(mp, r / "ro", errno.EROFS)),
    ("output-permission-denied", lambda r: (os.mkdir(r / "ro"), ["dpo", "--recipe", recipe(r, {**pref(r), "output_dir": str(r / "ro/run")})])[1],
     "output_dir: cannot write in {root}/ro (Permission denied)", lambda mp, r: deny(mp, r / "ro", errno.EACCES)),
    ("resume-and-force", sft(None, "--resume", "--force"), "--resume and --force: choose one", None),
    ("no-disk-for-checkpoints", sft(), "MiB free for checkpoints and the adapter, {root} has 1000 B", no_disk),
    # runs read back by sft --resume
    ("resume-run-json-garbage", with_run(lambda run, r: (write(run / "run.json", "{oops"), ["--recipe", recipe(
        r, {"output_dir": str(run)}), "--resume"])[1], "sft"), "run.json: not valid JSON", None),
    ("resume-recipe-missing", with_run(lambda run, r: ((run / "recipe.yaml").unlink(), status("interrupted")(run, r), ["--recipe", recipe(
        r, {"output_dir": str(run)}), "--resume"])[2], "sft"), "has no recipe.yaml, so the run cannot be checked", None),
    ("resume-recipe-garbage", with_run(lambda run, r: (write(run / "recipe.yaml", "model: [\n"), status("interrupted")(run, r), ["--recipe", recipe(
        r, {"output_dir": str(run)}), "--resume"])[2], "sft"), "run/recipe.yaml:2: not valid YAML", None),
    ("resume-no-checkpoint", with_run(lambda run, r: (status("interrupted")(run, r), shutil.rmtree(run / "checkpoints"), [
        "--recipe", run / "recipe.yaml", "--resume"])[2], "sft"),
     "no complete checkpoint in", None),
    ("resume-from-incomplete", with_run(lambda run, r: (status("interrupted")(run, r), (run / "checkpoints/checkpoint-9").mkdir(), [
        "--recipe", run / "recipe.yaml", "--resume-from", run / "checkpoints/checkpoint-9"])[2], "sft"), "never completed", None),
    ("dpo-output-is-init-adapter", with_run(lambda run, r: ["--recipe", recipe(r, {**pref(r), "dpo": {"init_adapter": str(run), "max_prompt_length": 64},
                                                                                   "output_dir": str(run)}), "--force"], "dpo"),
     "is the initial adapter (dpo.init_adapter)", None),
    ("dpo-init-adapter-garbage", with_run(lambda run, r: (write(run / "adapter/adapter_config.json", "{oops"), [
        "--recipe", recipe(r, {**pref(r), "dpo": {"init_adapter": str(run), "max_prompt_length": 64},
                               "output_dir": str(r / "dpo")})])[1], "dpo"),
     "adapter/adapter_config.json: not valid JSON", None),
    # dsft experts
    ("experts-output-is-file", lambda r: (write(r / "afile", "x"), ["experts", "plan", "--recipe", recipe(r, {"output_dir": str(r / "afile")})])[1],
     "output_dir: {root}/afile is a file", None),
    ("experts-output-inside-model", lambda r: ["experts", "plan", "--recipe", recipe(
        r, {"model": {"path": str(ckpt(r))}, "output_dir": str(r / "ckpt/plan")})], "is inside the model checkpoint", None),
    ("experts-samples-zero", lambda r: ["experts", "profile", "--recipe", recipe(r), "--samples", "0"], "--samples: must be >= 1 (got 0)", None),
    ("experts-bad-recipe", lambda r: ["experts", "plan", "--recipe", recipe(r, {"adapter": {"rank": 3}})], "adapter.rank: unknown key", None),
    ("experts-readonly", lambda r: (os.mkdir(r / "ro"), ["experts", "profile", "--recipe", recipe(r, {"output_dir": str(r / "ro/run")})])[1],
     "output_dir: cannot write in {root}/ro (Read-only file system)", lambda mp, r: deny(mp, r / "ro", errno.EROFS)),
    # dsft eval
    ("eval-run-missing", lambda r: ["eval", "--adapter", r / "nope"], "--adapter {root}/nope: no such run directory", None),
    ("eval-not-a-run", lambda r: ["eval", "--adapter", r], "{root}: neither a dsft run directory nor an adapter directory", None),
    ("eval-run-json-garbage", with_run(lambda run, r: write(run / "run.json", "{oops") and None, "eval"), "run/run.json: not valid JSON", None),
    ("eval-run-json-list", with_run(lambda run, r: write(run / "run.json", "[]") and None, "eval"), "run.json: must be a JSON object", None),
    ("eval-recipe-garbage", with_run(lambda run, r: write(run / "recipe.yaml", "model: [\n") and None, "eval"), "run/recipe.yaml:2: not valid YAML", None),
    ("eval-recipe-schema", with_run(lambda run, r: write(run / "recipe.yaml", (run / "recipe.yaml").read_text() + "colour: blue\n") and None, "eval"),
     "run/recipe.yaml: colour: unknown key", None),
    ("eval-failed-run", with_run(status("failed"), "eval"), "the run is failed; resume it with `dsft sft --recipe", None),
    ("eval-stopped-run", with_run(status("running"), "eval"), "the run was stopped before it finished", None),
    ("eval-data-missing", with_run(lambda run, r: ["--data", r / "nope.jsonl"], "eval"), "--data {root}/nope.jsonl: file not found", None),
    ("eval-data-bad-row", with_run(lambda run, r: ["--data", write(r / "held.jsonl", "{oops\n")], "eval"), "held.jsonl:1: not valid JSON", None),
    ("eval-samples-negative", with_run(lambda run, r: ["--samples", "-1"], "eval"), "--samples: must be >= 1 (got -1)", None),
    ("eval-generations-negative", with_run(lambda run, r: ["--generations", "-2"], "eval"), "--generations: must be >= 0 (got -2)", None),
    ("eval-max-new-tokens-zero", with_run(lambda run, r: ["--max-new-tokens", "0"], "eval"), "--max-new-tokens: must be >= 1 (got 0)", None),
    ("eval-adapter-config-garbage", with_run(lambda run, r: write(run / "adapter/adapter_config.json", "{oops") and None, "eval"),
     "adapter/adapter_config.json: not valid JSON", None),
    ("eval-adapter-truncated", with_run(lambda run, r: truncate(run / "adapter/adapter_model.safetensors") and None, "eval"),
     "adapter_model.safetensors is truncated", None),
    ("eval-adapter-pickle", with_run(lambda run, r: (run / "adapter/adapter_model.safetensors").rename(run / "adapter/adapter_model.bin") and None, "eval"),
     "holds only pickle weights (adapter_model.bin); dsft never unpickles", None),
    ("eval-dsft-adapter-json-garbage", with_run(lambda run, r: write(run / "adapter/dsft_adapter.json", "{oops") and None, "eval"),
     "adapter/dsft_adapter.json: not valid JSON", None),
    ("eval-no-adapter", with_run(lambda run, r: shutil.rmtree(run / "adapter"), "eval"), "the run has no adapter/", None),
    ("eval-base-gone", with_run(recipe_base(lambda r: r / "gone"), "eval"), "recipe.yaml: model.path: model directory {root}/gone does not exist", None),
    ("eval-base-other-model", with_run(recipe_base(lambda r: ckpt(r, "v2", "tiny-deepseek-v2")), "eval"),
     "is not the model this adapter was trained on: model_type 'deepseek_v2'", None),
    ("eval-base-damaged", with_run(recipe_base(lambda r: truncate(ckpt(r) / "model.safetensors").parent), "eval"),
     "recipe.yaml: model.path: {root}/ckpt/model.safetensors is truncated", None),
    ("eval-no-held-out", with_run(lambda run, r: None, "eval"), "--data: the run has no held-out data", None),
    ("eval-readonly-run", with_run(lambda run, r: None, "eval"), "--adapter: cannot write in {root}/run (Read-only file system)",
     lambda mp, r: deny(mp, r / "run", errno.EROFS)),
    # dsft chat
    ("chat-run-missing", lambda r: ["chat", "--adapter", r / "nope", "--prompt", "hi"], "--adapter {root}/nope: no such run directory", None),
    ("chat-max-new-tokens-negative", with_run(lambda run, r: ["--max-new-tokens", "-1"], "chat"), "--max-new-tokens: must be >= 1 (got -1)", None),
    ("chat-stopped-run", with_run(status("running"), "chat"), "was stopped before it finished; resume it", None),
    ("chat-interrupted-run", with_run(status("interrupted"), "chat"), "the run is interrupted; resume it", None),
    ("chat-base-other-model", with_run(recipe_base(lambda r: ckpt(r, "v2", "tiny-deepseek-v2")), "chat"),
     "is not the model this adapter was trained on", None),
    ("chat-adapter-config-list", with_run(lambda run, r: write(run / "adapter/adapter_config.json", "[]") and None, "chat"),
     "adapter_config.json: must be a JSON object", None),
    ("chat-adapter-no-rank", with_run(lambda run, r: write(run / "adapter/adapter_config.json", "{}") and None, "chat"),
     "no LoRA rank `r`", None),
    ("chat-not-a-run", lambda r: ["chat", "--adapter", r], "neither a dsft run directory nor an adapter directory", None),
    ("chat-tokenizer-garbage", with_run(lambda run, r: write(run / "adapter/tokenizer.json", "{oops") and None, "chat"),
     "adapter: the tokenizer files cannot be read", None),
    # dsft merge: never over its inputs or a user's directory
    ("merge-out-is-base-force", merge_into(lambda r, run: r / "ckpt", "--force", base=lambda r: ckpt(r)),
     "--out: {root}/ckpt is the base checkpoint; dsft never writes over its inputs", None),
    ("merge-out-is-run-force", merge_into(lambda r, run: run, "--force"), "is the run being merged (--adapter)", None),
    ("merge-out-is-adapter-force", merge_into(lambda r, run: run / "adapter", "--force"), "is the adapter (--adapter)", None),
    ("merge-out-contains-base-force", merge_into(lambda r, run: r / "models", "--force", base=lambda r: ckpt(r, "models/ckpt")),
     "contains the base checkpoint", None),
    ("merge-out-inside-base", merge_into(lambda r, run: r / "ckpt/merged", base=lambda r: ckpt(r)), "is inside the model checkpoint", None),
    ("merge-out-user-dir-force", merge_into(lambda r, run: write(r / "mine/a.txt", "mine").parent, "--force"),
     "holds files dsft did not write (a.txt); --force replaces only a merged checkpoint dsft wrote", None),
    ("merge-out-exists", merge_into(lambda r, run: write(r / "mine/a.txt", "mine").parent), "holds files dsft did not write (a.txt)", None),
    ("merge-out-is-file", merge_into(lambda r, run: write(r / "afile", "x"), "--force"), "--out: {root}/afile is a file", None),
    ("merge-out-parent-is-file", merge_into(lambda r, run: write(r / "afile", "x") / "m"), "is a file, so", None),
    ("merge-out-readonly", merge_into(lambda r, run: (os.mkdir(r / "ro"), r / "ro/merged")[1]),
     "--out: cannot write in {root}/ro (Read-only file system)", lambda mp, r: deny(mp, r / "ro", errno.EROFS)),
    ("merge-no-disk", merge_into(lambda r, run: r / "merged"), "the merged checkpoint needs about", no_disk),
    ("merge-requantize-without-fp8", merge_into(lambda r, run: r / "merged", "--requantize"),
     "--requantize: re-quantizes touched FP8 weights, so it needs --dtype fp8", None),
    ("merge-fp8-on-bf16-base", merge_into(lambda r, run: r / "merged", "--dtype", "fp8"),
     "is not an FP8 block-scaled checkpoint; leave --dtype at bf16", None),
    ("merge-verify-layers-negative", merge_into(lambda r, run: r / "merged", "--verify", "--verify-layers", "-1"),
     "--verify-layers: must be >= 1 (got -1)", None),
    ("merge-adapter-missing", lambda r: ["merge", "--adapter", r / "nope", "--out", r / "merged"], "--adapter {root}/nope: no such directory", None),
    ("merge-adapter-config-garbage", merge_damaged(lambda run, r: write(run / "adapter/adapter_config.json", "{oops") and None),
     "adapter_config.json: not valid JSON", None),
    ("merge-adapter-truncated", merge_damaged(lambda run, r: truncate(run / "adapter/adapter_model.safetensors") and None),
     "adapter_model.safetensors is truncated", None),
    ("merge-adapter-pickle", merge_damaged(lambda run, r: (run / "adapter/adapter_model.safetensors").rename(
        run / "adapter/adapter_model.bin") and None), "holds only pickle weights", None),
    ("merge-dsft-adapter-json-garbage", merge_damaged(lambda run, r: write(run / "adapter/dsft_adapter.json", "[1]") and None),
     "dsft_adapter.json: must be a JSON object", None),
    ("merge-run-recipe-garbage", merge_damaged(lambda run, r: write(run / "recipe.yaml", "a: [\n") and None), "recipe.yaml:2: not valid YAML", None),
    ("merge-failed-run", merge_damaged(status("failed")), "the run is failed; resume it with", None),
    ("merge-base-missing", merge_damaged(lambda run, r: ["--base", r / "nope"]), "--base: model directory {root}/nope does not exist", None),
    ("merge-base-truncated", merge_damaged(lambda run, r: ["--base", truncate(ckpt(r) / "model.safetensors").parent]),
     "--base: {root}/ckpt/model.safetensors is truncated", None),
    ("merge-base-config-list", merge_damaged(lambda run, r: ["--base", write(ckpt(r) / "config.json", "[]").parent]),
     "--base: {root}/ckpt/config.json must be a JSON object", None),
    ("merge-base-index-list", merge_damaged(lambda run, r: ["--base", write(ckpt(r) / "model.safetensors.index.json", "[]").parent]),
     "model.safetensors.index.json must be a JSON object", None),
    ("merge-base-int-dtype", merge_damaged(lambda run, r: ["--base", edit_weights(ckpt(r), lambda t: t.__setitem__(
        "model.norm.weight", t["model.norm.weight"].to(__import__("torch").int32)))]), "is stored as I32", None),
    # dsft export --format vllm: the same rules as every writer
    ("export-out-is-run-force", export_into(lambda r, run: run, "--force"), "is the run being exported (--adapter)", None),
    ("export-out-user-dir-force", export_into(lambda r, run: write(r / "mine/a.txt", "mine").parent, "--force"),
     "holds files dsft did not write (a.txt)", None),
    ("export-out-exists", export_into(lambda r, run: write(r / "mine/a.txt", "mine").parent), "holds files dsft did not write", None),
    ("export-out-inside-base", export_into(lambda r, run: __import__("dsft.models.load", fromlist=["x"]).resolve_model_path(
        "builtin:tiny-deepseek-v3") / "vllm"), "is inside the model checkpoint", None),
    ("export-failed-run", export_into(lambda r, run: r / "vllm", damage=status("failed")), "the run is failed; resume it with", None),
    ("export-adapter-truncated", export_into(lambda r, run: r / "vllm", damage=lambda run, r: truncate(
        run / "adapter/adapter_model.safetensors")), "adapter_model.safetensors is truncated", None),
    ("export-bad-format", export_into(lambda r, run: r / "vllm", "--format", "tgi"), "--format: must be one of vllm, peft (got 'tgi')", None),
    ("export-peft-router-whole", lambda r: ["export", "--adapter", _router_run(r), "--format", "peft", "--out", str(r / "peft")],
     "which a PEFT LoRA adapter cannot hold; merge the run instead (dsft merge)", None),
    ("merge-base-other-model", merge_damaged(lambda run, r: ["--base", ckpt(r, "v2", "tiny-deepseek-v2")]),
     "is not the model this adapter was trained on", None),
    # rule 1: the tensors are the truth; metadata and config are checked against them and the base
    ("merge-meta-expert-rank", merge_damaged(meta(lambda m: m["routed_experts"].update(r=8))),
     "routed_experts.r is 8, but the weights and adapter_config.json give 4", None),
    ("merge-config-rank", merge_damaged(adapter_cfg(lambda c: c.update(r=8))), "but adapter_config.json gives it r 8", None),
    ("merge-meta-expert-dropped", merge_damaged(meta(lambda m: m["routed_experts"]["experts"].update({"1": [0]}))),
     "routed_experts.experts['1'] lists 1 experts [0], but model.layers.1.mlp.experts", None),
    ("export-meta-expert-range", export_into(lambda r, run: r / "vllm", damage=meta(
        lambda m: m["routed_experts"]["experts"].update({"1": [0, 9]}))), "lists expert 9, but the base has 8 experts per layer", None),
    ("eval-meta-expert-repeated", with_run(meta(lambda m: m["routed_experts"]["experts"].update({"1": [3, 3]})), "eval"),
     "[3, 3] repeats an id", None),
    ("chat-meta-layer-without-weights", with_run(meta(lambda m: m["routed_experts"]["experts"].update({"2": [1]})), "chat"),
     "routed_experts.experts lists layer 2, but adapter_model.safetensors holds no expert weights for it", None),
    ("merge-meta-group-extra-module", merge_damaged(meta(lambda m: m["groups"]["attention"]["modules"].append(
        "model.layers.0.self_attn.nope"))), "groups.attention lists model.layers.0.self_attn.nope, which has no weights", None),
    ("merge-meta-group-missing-module", merge_damaged(meta(lambda m: m["groups"]["attention"]["modules"].pop())),
     "holds LoRA weights for model.layers.2.self_attn.o_proj, which no group lists", None),
    ("merge-meta-alpha-text", merge_damaged(meta(lambda m: m["routed_experts"].update(alpha="8"))),
     "routed_experts.alpha is '8'", None),
    ("merge-config-alpha-text", merge_damaged(adapter_cfg(lambda c: c.update(lora_alpha="8"))),
     "lora_alpha must be a positive finite number (got '8')", None),
    ("merge-lora-nan", merge_damaged(lora(LORA_B, float("nan"))), f"tensor {LORA_B} holds NaN values", None),
    ("export-lora-inf", export_into(lambda r, run: r / "vllm", damage=lora(LORA_B, float("inf"))), "holds infinite values", None),
    ("eval-lora-nan", with_run(lambda run, r: lora(LORA_B, float("nan"))(run, r), "eval"), "holds NaN values", None),
    ("dpo-init-adapter-nan", with_run(lambda run, r: (lora(LORA_B, float("nan"))(run, r), [
        "--recipe", recipe(r, {**pref(r), "dpo": {"init_adapter": str(run), "max_prompt_length": 64}, "output_dir": str(r / "dpo")})])[1],
        "dpo"), "holds NaN values", None),
    ("merge-dora", merge_damaged(adapter_cfg(lambda c: c.update(use_dora=True))),
     "the adapter uses DoRA (use_dora: true), whose weight change dsft does not compute", None),
    ("merge-peft-bias", merge_damaged(adapter_cfg(lambda c: c.update(bias="all"))), "trained biases (bias: 'all')", None),
    # rule 2: identity: the base is the one the run trained on, a checkpoint is the run's own
    ("merge-base-other-weights", merge_damaged(lambda run, r: ["--base", other_weights(r)]),
     "--base: {root}/other has the architecture but not the weights this adapter was trained on", None),
    ("export-base-other-weights", with_run(lambda run, r: ["--out", r / "vllm", "--base", other_weights(r)], "export"),
     "has the architecture but not the weights", None),
    ("eval-base-other-weights", with_run(recipe_base(other_weights), "eval"), "has the architecture but not the weights", None),
    ("chat-base-other-weights", with_run(recipe_base(other_weights), "chat"), "pass --force to chat with the adapter on this", None),
    ("resume-base-other-weights", with_run(lambda run, r: (recipe_base(other_weights)(run, r), status("interrupted")(run, r), [
        "--recipe", run / "recipe.yaml", "--resume"])[2], "sft"), "--resume: model.path: {root}/other has the architecture but not", None),
    ("resume-data-changed", with_run(data_changed, "sft"), "data file {root}/train2.jsonl changed since the run started", None),
    ("resume-checkpoint-nan", with_run(lambda run, r: (status("interrupted")(run, r), lora(LORA_B, float("nan"))(
        run / "checkpoints/checkpoint-2", r, ""), ["--recipe", run / "recipe.yaml", "--resume"])[2], "sft"),
     "holds NaN values: training had diverged when checkpoint-2 was saved", None),
    ("resume-from-other-run", with_run(lambda run, r: (status("interrupted")(run, r), shutil.copytree(run, r / "other-run"), [
        "--recipe", run / "recipe.yaml", "--resume-from", r / "other-run/checkpoints/checkpoint-2"])[2], "sft"),
     "not a checkpoint of the run in {root}/run", None),
    ("dpo-init-adapter-other-weights", with_run(lambda run, r: ["--recipe", recipe(r, {
        **pref(r), "model": {"path": str(other_weights(r))}, "dpo": {"init_adapter": str(run), "max_prompt_length": 64},
        "output_dir": str(r / "dpo")})], "dpo"), "dpo.init_adapter: {root}/other has the architecture but not the weights", None),
    ("merge-adapter-checkpoint-damaged", needs_run(lambda r, source: ["merge", "--adapter", truncate(
        run_copy(r, source) / "checkpoints/checkpoint-2/adapter_model.safetensors").parent, "--out", r / "merged"]),
     "checkpoint-2: the checkpoint is damaged (adapter_model.safetensors is missing or truncated)", None),
    ("eval-adapter-checkpoint-without-metadata", needs_run(lambda r, source: ["eval", "--adapter", saved_before_metadata(
        run_copy(r, source) / "checkpoints/checkpoint-2"), "--on-train"]),
     "a checkpoint saved by a dsft before 2026-12-07, without its adapter's metadata", None),
    ("dpo-init-adapter-is-checkpoint", needs_run(lambda r, source: ["dpo", "--recipe", recipe(r, {
        **pref(r), "dpo": {"init_adapter": str(run_copy(r, source) / "checkpoints/checkpoint-2"), "max_prompt_length": 64},
        "output_dir": str(r / "dpo")})]), "a training checkpoint of the run {root}/run", None),
    # rule 3: links resolved before any decision; staging locked; a tracker directory is dsft's only as far as it wrote it
    ("merge-out-link-loop", merge_into(lambda r, run: loop(r)), "--out: {root}/loop-a is a loop of symbolic links", None),
    ("export-out-link-into-base", export_into(lambda r, run: link(r / "vllm", ckpt(r))), "is inside the model checkpoint", None),
    ("export-out-link-to-user-dir-force", export_into(lambda r, run: link(r / "vllm", write(r / "mine/a.txt", "mine").parent), "--force"),
     "holds files dsft did not write (a.txt)", None),
    ("merge-out-link-to-run-force", merge_into(lambda r, run: link(r / "merged", run), "--force"), "is the run being merged (--adapter)", None),
    ("sft-output-link-to-user-dir-force", lambda r: (write(r / "mine/notes.txt", "mine"), link(r / "runlink", r / "mine"), [
        "sft", "--force", "--recipe", recipe(r, {"output_dir": str(r / "runlink")})])[2],
     "output_dir: {root}/mine holds files dsft did not write (notes.txt)", None),
    ("sft-force-tracker-user-file", with_run(reports_to_tensorboard, "sft"),
     "holds files dsft did not write (tensorboard/notes.txt)", None),
    ("export-staging-locked", export_into(lambda r, run: (write(r / ".vllm.dsft-partial/.dsft.lock", ""), r / "vllm")[1]),
     "--out {root}/vllm: another dsft process is writing it", hold(Path(".vllm.dsft-partial/.dsft.lock"))),
    ("merge-staging-locked", merge_into(lambda r, run: (write(r / ".merged.dsft-partial/.dsft.lock", ""), r / "merged")[1]),
     "--out {root}/merged: another dsft process is writing it", hold(Path(".merged.dsft-partial/.dsft.lock"))),
    # rule 5: convert takes exactly the release's weight files
    ("convert-index-shard-missing", lambda r: ["convert", "--model", bin_release(r, {
        "pytorch_model-00001-of-00002.bin": {"a": 1}, "pytorch_model-00002-of-00002.bin": None}), "--out", r / "st"],
     "shard pytorch_model-00002-of-00002.bin listed in pytorch_model.bin.index.json is missing", None),
    ("convert-numbered-shard-missing", lambda r: ["convert", "--model", bin_release(r, {
        "pytorch_model-00001-of-00003.bin": {"a": 1}, "pytorch_model-00003-of-00003.bin": {"b": 1}}, index=False), "--out", r / "st"],
     "shard pytorch_model-00002-of-00003.bin is missing", None),
    ("convert-tensor-twice", lambda r: ["convert", "--model", bin_release(r, {
        "pytorch_model-00001-of-00002.bin": {"a": 1}, "pytorch_model-00002-of-00002.bin": {"a": 1}}, index=False), "--out", r / "st"],
     "tensor a is also in pytorch_model-00001-of-00002.bin", None),
    ("convert-out-link-loop", lambda r: ["convert", "--model", bin_release(r, {"pytorch_model.bin": {"a": 1}}, index=False),
                                         "--out", loop(r)], "is a loop of symbolic links", None),
    # rule 6: validate --check-files checks what sft / dpo check before loading weights
    ("validate-expert-out-of-range", lambda r: ["validate", recipe(r, {"adapter": {"routed_experts": {1: [9]}}}), "--check-files"],
     "layer 1: expert ids go up to 7, got 9", None),
    ("validate-dense-layer-experts", lambda r: ["validate", recipe(r, {"adapter": {"routed_experts": {0: [1]}}}), "--check-files"],
     "layer 0 has no routed experts", None),
    ("validate-max-length-drops-rows", lambda r: ["validate", recipe(r, {"data": {"max_length": 8}}), "--check-files"],
     "data.max_length 8: 4 of 4 rows lose every loss token", None),
    # rule 7: every input bounded: sizes, nesting, encodings, numbers
    ("recipe-alias-bomb", lambda r: ["validate", text_recipe(r, BOMB)], "expands to more than 100,000 values through YAML aliases", None),
    ("recipe-nested-deep", lambda r: ["validate", text_recipe(r, "a: " + "[" * 100_000 + "]" * 100_000 + "\n")],
     "recipe.yaml: not valid YAML (nested too deeply to read)", None),
    ("recipe-lone-surrogate", lambda r: ["validate", text_recipe(
        r, f'model: {{path: "builtin:tiny-deepseek-v3"}}\ndata: {{train: {r / "train.jsonl"}}}\noutput_dir: "run\\ud800"\n')],
     "output_dir: holds a lone UTF-16 surrogate", None),
    ("recipe-expert-id-inf", lambda r: ["validate", recipe(r, {"adapter": {"routed_experts": {1: [float("inf")]}}})],
     "layer 1: give a non-empty list of integer expert ids >= 0", None),
    ("recipe-expert-layer-inf", lambda r: ["validate", recipe(r, {"adapter": {"routed_experts": {float("inf"): [1]}}})],
     "layer inf: layers are integers >= 0", None),
    ("recipe-expert-id-bool", lambda r: ["validate", recipe(r, {"adapter": {"routed_experts": {1: [0, True]}}})],
     "give a non-empty list of integer expert ids", None),
    ("data-lone-surrogate", lambda r: ["sft", "--recipe", recipe(r, {"data": {"train": str(write(
        r / "d.jsonl", '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "x"}]}\n'))}})],
     "d.jsonl:1: field 'messages'[0].content: holds a lone UTF-16 surrogate", None),
    ("data-nested-deep", lambda r: ["sft", "--recipe", recipe(r, {"data": {"train": str(write(
        r / "d.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"))}})], "d.jsonl:1: nested too deeply to read", None),
    ("eval-data-is-training-file", with_run(lambda run, r: ["--data", write(r / "same.jsonl", Path(trained_on(run)).read_bytes())], "eval"),
     "the run trained on this file", None),
    ("dsft-cache-is-file", lambda r: (write(r / "afile", "x"), ["sft", "--recipe", recipe(r)])[1],
     "DSFT_CACHE={root}/afile: {root}/afile is a file, not a directory", lambda mp, r: mp.setenv("DSFT_CACHE", str(r / "afile"))),
    ("dsft-cache-readonly", lambda r: (os.mkdir(r / "ro"), ["sft", "--recipe", recipe(r)])[1],
     "DSFT_CACHE={root}/ro/cache: cannot write", lambda mp, r: (mp.setenv("DSFT_CACHE", str(r / "ro/cache")), deny(mp, r / "ro", errno.EROFS))),
    # the objectives as plug-ins: KTO, ORPO, SimPO
    ("kto-wrong-format", lambda r: ["kto", "--recipe", recipe(r, {"kto": {"max_prompt_length": 64}, "training": {"micro_batch_size": 2}})],
     "data.format: `dsft kto` trains on kto or preference rows; set data.format to kto (got messages)", None),
    ("kto-missing-label", lambda r: ["kto", "--recipe", recipe(r, feedback(r, [{"prompt": "Q?", "completion": "A."}]))],
     "feedback.jsonl:1: missing field 'label' (true or 1 for a desirable completion", None),
    ("kto-label-not-bool", lambda r: ["kto", "--recipe", recipe(r, feedback(r, [{"prompt": "Q?", "completion": "A.", "label": "yes"}]))],
     "feedback.jsonl:1: field 'label' must be true or false (or 1 or 0), got 'yes'", None),
    ("kto-labels-one-value", lambda r: ["kto", "--recipe", recipe(r, feedback(r, [{"prompt": "Q?", "completion": "A.", "label": True},
                                                                               {"prompt": "R?", "completion": "B.", "label": True}]))],
     "data.train: every row is labelled true (desirable); KTO learns from both: add rows labelled false", None),
    ("kto-micro-batch-one", lambda r: ["kto", "--recipe", recipe(r, _deep(feedback(r, [{"prompt": "Q?", "completion": "A.", "label": True}]),
                                                                          {"training": {"micro_batch_size": 1}}))],
     "training.micro_batch_size 1: kto.loss_type kto estimates its KL term", None),
    ("orpo-on-conversations", lambda r: ["orpo", "--recipe", recipe(r)],
     "data.format: `dsft orpo` trains on preference rows; set data.format to preference", None),
    ("simpo-unknown-key", lambda r: ["validate", recipe(r, {**pref(r), "simpo": {"lambda": 1.0, "max_prompt_length": 64}})],
     "simpo.lambda: unknown key; remove it (valid keys here: init_adapter, max_prompt_length, prompt_overflow, beta, gamma)", None),
    ("orpo-trl-experimental-missing", lambda r: ["orpo", "--recipe", recipe(r, {**pref(r), "orpo": {"max_prompt_length": 64}})],
     "trl.experimental.orpo: not in the installed TRL", lambda mp, r: no_experimental(mp)),
    # GRPO: prompts, rewards (every reward is called on the first row before anything is created)
    ("grpo-wrong-format", lambda r: ["grpo", "--recipe", recipe(r, {"grpo": prompts(r)["grpo"], "training": {"micro_batch_size": 2}})],
     "data.format: `dsft grpo` trains on prompt rows; set data.format to prompt (got messages)", None),
    ("grpo-no-rewards", lambda r: ["validate", recipe(r, prompts(r, rewards=[{"builtin": "think_format"}]) | {"grpo": {"rewards": []}})],
     "grpo.rewards: list at least one reward", None),
    ("grpo-messages-end-with-answer", lambda r: ["grpo", "--recipe", recipe(r, prompts(r, [{"messages": [
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}]))],
     "prompts.jsonl:1: field 'messages' must end with a user turn (the completion is generated)", None),
    ("grpo-reserved-column", lambda r: ["grpo", "--recipe", recipe(r, prompts(r, [{"prompt": "Q?", "completions": "x"}]))],
     "prompts.jsonl:1: field 'completions': TRL passes reward functions a keyword of that name itself", None),
    ("grpo-reward-file-missing", lambda r: ["grpo", "--recipe", recipe(r, prompts(r, rewards=[{"function": "nope.py:f"}]))],
     "file not found: nope.py", None),
    ("grpo-reward-function-missing", grpo_reward("def g(**k):\n    return []\n"),
     "grpo.rewards[0].function: {root}/rewards.py has no function 'f' (it has g)", None),
    ("grpo-reward-file-does-not-import", grpo_reward("import not_a_module\n"),
     "grpo.rewards[0].function: {root}/rewards.py does not import (ModuleNotFoundError", None),
    ("grpo-reward-raises", grpo_reward("def f(prompts, completions, **k):\n    return [1 / len(c) for c in completions]\n"),
     "grpo.rewards[0] (f): raised ZeroDivisionError: division by zero (line 2 of rewards.py) on the row at "
     "{root}/prompts.jsonl:1", None),
    ("grpo-reward-wrong-count", grpo_reward("def f(prompts, completions, **k):\n    return [1.0]\n"),
     "grpo.rewards[0] (f): returned 1 rewards for 2 completions", None),
    ("grpo-reward-nan", grpo_reward("def f(prompts, completions, **k):\n    return [float('nan')] * len(completions)\n"),
     "grpo.rewards[0] (f): returned nan for the row at {root}/prompts.jsonl:1", None),
    ("grpo-reward-inf", grpo_reward("def f(prompts, completions, **k):\n    return [float('inf')] * len(completions)\n"),
     "grpo.rewards[0] (f): returned inf for the row at", None),
    ("grpo-reward-not-a-number", grpo_reward("def f(prompts, completions, **k):\n    return ['high'] * len(completions)\n"),
     "grpo.rewards[0] (f): returned 'high' (str) for the row at", None),
    ("grpo-reward-reads-missing-column", grpo_reward("def f(prompts, completions, statute, **k):\n    return [1.0] * len(completions)\n"),
     "grpo.rewards[0] (f): raised TypeError", None),
    ("grpo-answer-match-without-answers", lambda r: ["grpo", "--recipe", recipe(r, prompts(
        r, [{"prompt": "Q?"}], rewards=[{"builtin": "answer_match"}]))],
     "the answer_match reward reads each row's `answer` column, and the rows have none", None),
    ("grpo-regex-invalid", lambda r: ["validate", recipe(r, prompts(r, rewards=[{"builtin": "regex", "pattern": "(§"}]))],
     "pattern '(§' is not a valid regular expression", None),
    ("grpo-reward-stray-option", lambda r: ["validate", recipe(r, prompts(r, rewards=[{"builtin": "regex", "pattern": "x", "target": 3}]))],
     "target: not an option of the regex reward; remove it", None),
    ("grpo-use-vllm", lambda r: ["validate", recipe(r, prompts(r, use_vllm=True))],
     "grpo.use_vllm: not supported yet: TRL's vLLM weight sync merges the adapter into full weights", None),
    ("grpo-groups-split", lambda r: ["validate", recipe(r, _deep(prompts(r, num_generations=4), {"training": {"micro_batch_size": 3}}))],
     "training.micro_batch_size 3: GRPO counts completions", None),
    ("grpo-save-between-generations", lambda r: ["validate", recipe(r, _deep(prompts(r, steps_per_generation=4), {
        "training": {"grad_accum": 2, "save_steps": 3}}))],
     "training.save_steps 3: one generation spans 2 optimizer steps", None),
    ("grpo-sequence-too-long", lambda r: ["validate", recipe(r, prompts(r, max_prompt_length=100, max_completion_length=64))],
     "data.max_length 128: a sequence is grpo.max_prompt_length 100 + grpo.max_completion_length 64 tokens", None),
    # a reward function is user code: every way out of it is its named failure, before anything is created
    ("grpo-reward-sys-exit", grpo_reward("import sys\ndef f(prompts, completions, **k):\n    sys.exit(0)\n"),
     "grpo.rewards[0] (f): raised SystemExit: sys.exit(0) inside the function (line 3 of rewards.py) on the row at", None),
    ("grpo-reward-os-exit", grpo_reward("import os\ndef f(prompts, completions, **k):\n    os._exit(0)\n"),
     "grpo.rewards[0] (f): exited (code 0: sys.exit or os._exit inside the function or its imports) on the row at", None),
    ("grpo-reward-hangs", lambda r: ["grpo", "--recipe", recipe(r, prompts(r, rewards=reward_file(
        r, "def f(prompts, completions, **k):\n    while True:\n        pass\n"), reward_timeout=1))],
     "grpo.rewards[0] (f): did not return within 1 s for one batch (grpo.reward_timeout", None),
    ("grpo-reward-exits-on-import", grpo_reward("import sys\nsys.exit(3)\n"),
     "grpo.rewards[0].function: {root}/rewards.py does not import (SystemExit: 3 (line 2 of rewards.py))", None),
    ("grpo-row-field-dsft-own", lambda r: ["grpo", "--recipe", recipe(r, prompts(r, [{"prompt": "Q?", "dsft_row": "mine"}]))],
     "prompts.jsonl:1: field 'dsft_row': names starting with 'dsft_' are dsft's own", None),
    ("grpo-cispo-epsilon", lambda r: ["validate", recipe(r, prompts(r, loss_type="cispo", epsilon=0.1))],
     "grpo.epsilon: the cispo loss does not read it; remove it (cispo caps its weights at epsilon_high)", None),
    ("grpo-sapo-epsilon-high", lambda r: ["validate", recipe(r, prompts(r, loss_type="sapo", epsilon_high=0.3))],
     "grpo.epsilon_high: the sapo loss does not read it; remove it", None),
    ("grpo-kl-correction-without-kl", lambda r: ["validate", recipe(r, prompts(r, kl_bias_correction=False))],
     "grpo.kl_bias_correction: only read with a KL term; set grpo.beta above 0 or remove it", None),
    # every data edge where all rows are dropped: one line before any run directory (and no cache entry)
    ("grpo-every-prompt-dropped", lambda r: ["grpo", "--recipe", recipe(r, prompts(
        r, [{"prompt": "Why? " * 60, "answer": "4"}] * 2, max_prompt_length=16, prompt_overflow="drop"))],
     "grpo.max_prompt_length 16: every prompt of data.train is longer (2 rows dropped by grpo.prompt_overflow: drop)", None),
    ("dpo-every-prompt-dropped", lambda r: ["dpo", "--recipe", recipe(r, _deep(pref(r, [{**PAIR, "prompt": "Why? " * 60}] * 2), {
        "dpo": {"max_prompt_length": 16, "prompt_overflow": "drop"}}))],
     "dpo.max_prompt_length 16: every prompt of data.train is longer (2 rows dropped by dpo.prompt_overflow: drop)", None),
    ("mix-rows-absurd", lambda r: ["validate", recipe(r, {"data": {"train": [{"path": str(write_jsonl(r / "a.jsonl", legal_rows(2))),
                                                                             "rows": 100_000_000_000}]}})],
     "data.train[0].rows: a whole number of rows from 1 to 1,000,000,000 (got 100000000000)", None),
    ("mix-rows-absurd-in-all", lambda r: ["sft", "--recipe", recipe(r, {"data": {"train": [
        {"path": str(write_jsonl(r / "a.jsonl", legal_rows(4))), "rows": 900_000_000},
        {"path": str(write_jsonl(r / "b.jsonl", legal_rows(4))), "rows": 900_000_000}]}})],
     "data.train[0]: the mix would take 1,800,000,000 rows in all", None),
    # a recipe section another objective owns is never silently ignored
    ("simpo-on-a-dpo-recipe", lambda r: ["simpo", "--recipe", recipe(r, {**pref(r), "dpo": {"beta": 0.3, "max_prompt_length": 64}})],
     "dpo: this section is for `dsft dpo`; `dsft simpo` does not read it (it sets beta, max_prompt_length): run `dsft dpo`, "
     "or rename the section to `simpo:` and check its keys", None),
    ("sft-on-a-grpo-recipe", lambda r: ["sft", "--recipe", recipe(r, {"grpo": prompts(r)["grpo"], "training": {"micro_batch_size": 2}})],
     "grpo: this section is for `dsft grpo`; `dsft sft` does not read it", None),
    ("recipe-two-objectives", lambda r: ["validate", recipe(r, {**pref(r), "dpo": {"max_prompt_length": 64},
                                                            "simpo": {"max_prompt_length": 64}})],
     "dpo, simpo: a recipe is for one objective", None),
    # outputs never inside a checkpoint, an adapter or a run's checkpoints
    ("export-out-inside-run-adapter", export_into(lambda r, run: run / "adapter" / "vllm"),
     "is inside the adapter directory {root}/run/adapter", None),
    ("export-out-inside-run-checkpoints", export_into(lambda r, run: run / "checkpoints" / "vllm"),
     "is inside the run's checkpoints directory {root}/run/checkpoints", None),
    ("convert-fp8-dtype-unknown", lambda r: ["convert", "--model", released_v3(r), "--out", r / "plain", "--dtype", "fp16"],
     "--dtype: must be one of bfloat16, float32 (got 'fp16')", None),
    ("convert-bin-dtype", lambda r: ["convert", "--model", bin_release(r, {"pytorch_model.bin": {"a": 1}}, index=False),
                                     "--out", r / "st", "--dtype", "float32"],
     "--dtype float32: only an FP8 checkpoint is dequantized; a .bin checkpoint keeps its dtype", None),
    ("convert-out-inside-bin-release", lambda r: ["convert", "--model", bin_release(r, {
        "pytorch_model-00001-of-00002.bin": {"a": 1}, "pytorch_model-00002-of-00002.bin": {"b": 1}}, index=False),
        "--out", r / "bin" / "st"], "is inside the model checkpoint {root}/bin", None),
    # the prepared-data cache: a writer like any other
    ("cache-data-readonly", lambda r: sft({"data": {"system_prompt": f"Rows first seen in {r}."}})(r),
     "(Read-only file system); point DSFT_CACHE at a writable directory",
     lambda mp, r: deny(mp, Path(os.environ["DSFT_CACHE"]) / "data", errno.EROFS)),
    ("cache-data-disk-full", lambda r: ["dpo", "--recipe", recipe(r, _deep(pref(r), {
        "dpo": {"max_prompt_length": 64}, "data": {"system_prompt": f"Pairs {abs(hash(str(r))) % 10**8}."}}))],
     "No space left on device); point DSFT_CACHE at a writable directory", lambda mp, r: full_cache(mp)),
    ("cache-remove-unnamed", lambda r: ["cache", "remove"], "name the entries (KEY...), or pass --older-than AGE or --all", None),
    ("cache-remove-bad-age", lambda r: ["cache", "remove", "--older-than", "a while"],
     "--older-than 'a while': give an age like 30d, 12h, 2w or 90m", None),
    ("cache-verify-unknown-key", lambda r: ["cache", "verify", "0123abc"], "0123abc: no cache entry has this key", None),
    ("cache-remove-empty-key", lambda r: ["cache", "remove", ""], "KEY '': empty (an unset shell variable?)", None),
    ("cache-remove-not-a-key", lambda r: ["cache", "remove", "../data"], "../data: not a cache key", None),
    ("cache-remove-ambiguous-key", lambda r: (fake_entries("aaaa0", "aaaa1"), ["cache", "remove", "aaaa"])[1],
     "aaaa: the start of 2 entries' keys", None),
    ("cache-remove-all-and-a-key", lambda r: ["cache", "remove", "--all", "aaaa"], "--all removes every entry; give it alone", None),
]


def fake_entries(*prefixes: str) -> None:
    """Entry directories of these key prefixes (padded to 20 hex digits) in the cache, holding nothing."""
    from dsft.data.store import data_root

    for prefix in prefixes:
        (data_root() / prefix.ljust(20, "0")).mkdir(exist_ok=True)


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every path under `roots` with its content's hash; the cache's per-process views (scratch links this
    process makes to the entries it maps, removed when it ends) left out."""
    from dsft.data.store import VIEWS
    from dsft.outputs import cache_root

    views = cache_root() / VIEWS
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p == views or views in p.parents:
                continue
            key = str(p)
            if p.is_symlink():
                out[key] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[key] = "dir"
            else:
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(result: Any, expected: str) -> None:
    """Exit 2, no traceback, exactly one error line, and it says `expected`."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError)), result.output
    assert len(errors) == 1 and expected in errors[0], result.output


@pytest.mark.parametrize("case, setup, expected, patch", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: str, setup: Any, expected: str, patch: Any, tmp_path: Path, cli, request: pytest.FixtureRequest,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dsft.models.load import resolve_model_path

    resolve_model_path("builtin:tiny-deepseek-v3")  # the cache is materialised before the snapshot
    resolve_model_path("builtin:tiny-deepseek-v2")
    data_root()
    root = tmp_path / "root"
    root.mkdir()
    if getattr(setup, "needs_run", False):
        args = setup(root, request.getfixturevalue("finished_run"))
    else:
        args = setup(root)
    cache = Path(os.environ["DSFT_CACHE"])
    before = _snapshot(root, cache)
    if patch is not None:
        patch(monkeypatch, root)
    result = cli(*args)
    monkeypatch.undo()
    refused(result, expected.replace("{root}", str(root)))
    assert _without_new_entries(_snapshot(root, cache), before) == before, "the command changed files"


def _without_new_entries(after: dict[str, str], before: dict[str, str]) -> dict[str, str]:
    """A command refused after its data was checked and tokenized may leave that data's complete
    prepared-data entry (valid tokens of valid rows, found again by the next run), or note in an entry's
    meta.json another way to reach it (its fast-path key): not changes to refuse. Anything else in the cache,
    an entry's tokens, a temporary or a lock file included, is."""
    from dsft.data.store import DATA, META, entries, problem

    complete = {str(e) for e in entries() if problem(e) is None}
    kept = {}
    for k, v in after.items():
        entry = next((e for e in complete if k == e or k.startswith(e + os.sep)), None)
        if entry is None or k == entry and k in before:
            kept[k] = v
        elif k in before:
            same_tokens = after.get(f"{entry}/{DATA}") == before.get(f"{entry}/{DATA}")
            kept[k] = before[k] if k == f"{entry}/{META}" and same_tokens else v
    return kept


def test_the_table_is_documented_and_large() -> None:
    from test_errors import CASES as RECIPE_CASES

    text = (REPO / "docs/errors.md").read_text()
    missing = [case for case, *_ in CASES if f"`{case}`" not in text]
    assert not missing, f"docs/errors.md lacks {missing}"
    assert len(CASES) + len(RECIPE_CASES) >= 100
    assert len({c[0] for c in CASES} | {c[0] for c in RECIPE_CASES}) == len(CASES) + len(RECIPE_CASES)
