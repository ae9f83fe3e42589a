"""`dsft convert`: a checkpoint released as pickle `.bin` files, rewritten as safetensors.

Each `.bin` is read with `torch.load(weights_only=True)`, PyTorch's restricted unpickler that accepts
tensors and plain containers only: a file holding any other object is refused, never executed. Shards
keep their split (an index is written when there are several), tensors that share storage are written
once each (a tied `lm_head.weight` is left to `tie_word_embeddings`), and every other file (config,
tokenizer, generation config) is copied. The output is written to a hidden directory beside `--out` and
renamed at the end; `--force` replaces only a directory an earlier `dsft convert` wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dsft.errors import DsftError
from dsft.outputs import check_location, check_replaceable, read_json, staged

BIN_INDEX = "pytorch_model.bin.index.json"
RECORD = "dsft-convert.json"


def pickle_shards(path: Path) -> list[Path]:
    index = path / BIN_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise DsftError(f"{index}: no weight_map; re-download it")
        return [path / name for name in sorted(set(weight_map.values()))]
    return sorted(path.glob("*.bin"))


def _load(shard: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise DsftError(f"{shard}: not a plain tensor file ({str(e).splitlines()[0][:160]}); dsft loads only tensors "
                        "(torch.load weights_only) and never unpickles other objects") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DsftError(f"{shard}: holds no state dict of tensors; not a model weights file")
    return state


def convert(src: Path, out: Path, force: bool = False) -> dict[str, Any]:
    from safetensors.torch import save_file

    if not (src / "config.json").is_file():
        raise DsftError(f"--model {src}: no config.json; point it at the checkpoint directory")
    if (src / "model.safetensors").is_file() or (src / "model.safetensors.index.json").is_file():
        raise DsftError(f"--model {src}: already has safetensors weights; dsft loads it as it is")
    shards = pickle_shards(src)
    if not shards:
        raise DsftError(f"--model {src}: no pytorch_model*.bin weights to convert")
    check_location(out, "--out", {"checkpoint (--model)": [src]}, replaceable=True)
    check_replaceable(out, RECORD, "a converted checkpoint", force)
    tied = bool(read_json(src / "config.json").get("tie_word_embeddings", False))
    with staged(out) as tmp:
        weight_map = _write_shards(shards, tmp, tied, save_file)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".bin" and f.name != BIN_INDEX:
                shutil.copy2(f, tmp / f.name)
        if len(set(weight_map.values())) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        record = {"source": str(src.resolve()), "shards": sorted(set(weight_map.values())), "tensors": len(weight_map)}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _write_shards(shards: list[Path], tmp: Path, tied: bool, save_file: Any) -> dict[str, str]:
    weight_map: dict[str, str] = {}
    single = len(shards) == 1
    for i, shard in enumerate(shards, start=1):
        state = _load(shard)
        if tied:
            state.pop("lm_head.weight", None)
        seen: set[int] = set()
        tensors = {}
        for key, t in state.items():
            ptr = t.untyped_storage().data_ptr()
            tensors[key] = t.clone().contiguous() if ptr in seen else t.contiguous()  # safetensors refuses shared storage
            seen.add(ptr)
        name = "model.safetensors" if single else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    return weight_map
