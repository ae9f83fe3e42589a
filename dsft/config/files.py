"""Filesystem checks of a model directory, run by `validate --check-files` and every preflight.

Raises ValueError worded as the fix, so the schema reports it at the recipe key that named the path.
Reads JSON only: no torch, no transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsft.models.arch import SUPPORTED


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist; download the checkpoint there or fix the path")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path} has no config.json; point model.path at a transformers checkpoint directory")
    model_type = _json(config_path).get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not supported; use one of {', '.join(SUPPORTED)}")
    problems = _shard_problems(path) + _tokenizer_problems(path)
    if problems:
        raise ValueError("; ".join(problems))


def _shard_problems(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        return [f"{path} is missing shards named by its index: {', '.join(missing)}"] if missing else []
    if (path / "model.safetensors").is_file():
        return []
    return [f"{path} has no safetensors weights (model.safetensors or an index); dsft does not load pickle .bin files"]


def _tokenizer_problems(path: Path) -> list[str]:
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return [f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json); copy the checkpoint's tokenizer files there"]
    return []


def has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file():
        return True
    cfg = path / "tokenizer_config.json"
    return cfg.is_file() and bool(_json(cfg).get("chat_template"))
