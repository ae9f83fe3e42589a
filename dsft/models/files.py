"""Filesystem checks of a model directory, run by `validate --check-files` and every preflight.

Raises ValueError worded as the fix, so the schema reports it at the recipe key that named the path
(`model_dir_error` words it for a command option instead). Reads JSON and safetensors headers only: no
torch, no transformers. The shapes against the model's own classes are checked by
dsft.models.check, which needs transformers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from dsft.errors import DsftError
from dsft.arch import SUPPORTED, missing_config_keys

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a JSON object, got {type(data).__name__}; re-download it")
    return data


def read_model_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint, checked to be a mapping with what dsft's architecture code reads."""
    config_path = path / "config.json"
    config = _json(config_path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not supported; use one of {', '.join(SUPPORTED)}")
    missing = missing_config_keys(config)
    if missing:
        raise ValueError(f"{config_path}: missing {', '.join(missing)}; a {model_type} config needs them: "
                         "re-download config.json")
    return config


def check_model_dir(path: Path, tokenizer: bool = True) -> None:
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist; download the checkpoint there or fix the path")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; point model.path at a transformers checkpoint directory")
    try:
        read_model_config(path)
        problems = []
    except ValueError as e:  # reported with the shard and tokenizer problems, all at once
        problems = [str(e)]
    problems += _shard_problems(path) + (_tokenizer_problems(path) if tokenizer else [])
    if problems:
        raise ValueError("; ".join(problems))


def model_dir_error(path: Path, key: str, tokenizer: bool = True) -> None:
    """check_model_dir for a command option or a run's recorded base: DsftError naming `key`."""
    try:
        check_model_dir(path, tokenizer)
    except ValueError as e:
        raise DsftError(f"{key}: {e}") from None


def shard_names(path: Path) -> list[str]:
    """The safetensors files of a checkpoint, from its index or the single model.safetensors."""
    index = path / INDEX
    if not index.is_file():
        return ["model.safetensors"]
    weight_map = _json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} has no weight_map of tensor names to shard files; re-download it")
    return sorted(set(weight_map.values()))


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, offset where tensor data starts) of a safetensors file, checked: it parses, every entry
    names a dtype, shape and byte range of the right size, and the file holds all the bytes it names."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {len(head)} bytes); re-download it")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file (or its header is cut off); re-download it")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON); re-download it") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a mapping); re-download it")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            width = _WIDTH[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: header entry {name} is malformed; re-download the file") from None
        if stop - start != count * width:
            raise ValueError(f"{path}: {name} is {entry['dtype']} {entry['shape']} but holds {stop - start} bytes; "
                             "re-download the file")
        end = max(end, stop)
    if 8 + length + end > size:
        raise ValueError(f"{path} is truncated ({size} bytes, its header names {8 + length + end}); re-download it")
    return header, 8 + length


_WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
          "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def _shard_problems(path: Path) -> list[str]:
    if not (path / INDEX).is_file() and not (path / "model.safetensors").is_file():
        pickles = sorted(p.name for p in path.glob("*.bin"))
        if pickles:
            return [f"{path} holds only pickle weights ({', '.join(pickles[:2])}); dsft loads safetensors only "
                    f"(never unpickles): convert them with `dsft convert --model {path} --out {path}-safetensors`"]
        return [f"{path} has no safetensors weights (model.safetensors or an index); dsft does not load pickle .bin files"]
    shards = shard_names(path)
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        return [f"{path} is missing shards named by its index: {', '.join(missing)}"]
    for shard in shards:
        safetensors_header(path / shard)
    return []


def _tokenizer_problems(path: Path) -> list[str]:
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return [f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json); copy the checkpoint's tokenizer files there"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            _json(path / name)
    return []


def has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file():
        return True
    cfg = path / "tokenizer_config.json"
    return cfg.is_file() and bool(_json(cfg).get("chat_template"))
