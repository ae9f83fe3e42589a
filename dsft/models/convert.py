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
import re
import shutil
from pathlib import Path
from typing import Any

from dsft.errors import DsftError
from dsft.outputs import check_location, check_replaceable, read_json, resolve_output, staged, written_files

BIN_INDEX = "pytorch_model.bin.index.json"
RECORD = "dsft-convert.json"
_SHARD = re.compile(r"^pytorch_model-(\d+)-of-(\d+)\.bin$")


def pickle_shards(path: Path) -> list[Path]:
    """Exactly the release's weight files: those its index lists, else `pytorch_model.bin`, else the complete
    `pytorch_model-0000K-of-0000N.bin` series. Any other `.bin` (training_args.bin, optimizer states) is not
    a weight file; a listed or numbered shard that is missing is refused by name."""
    index = path / BIN_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise DsftError(f"{index}: no weight_map of tensor names to shard files; re-download it")
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if Path(n).name != n or not n.endswith(".bin")]
        if bad:
            raise DsftError(f"{index}: weight_map names {bad[0]!r}, not a .bin file in the checkpoint directory; "
                            "re-download the index")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise DsftError(f"--model {path}: shard {missing[0]} listed in {BIN_INDEX} is missing"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; download it")
        return [path / n for n in names]
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    numbered = {int(m.group(1)): int(m.group(2)) for p in path.glob("pytorch_model-*.bin") if (m := _SHARD.match(p.name))}
    if not numbered:
        return []
    total = max(numbered.values())
    if set(numbered.values()) != {total}:
        raise DsftError(f"--model {path}: the pytorch_model-*-of-*.bin shards disagree on their count "
                        f"({sorted(set(numbered.values()))}); remove the stray ones")
    missing = [k for k in range(1, total + 1) if k not in numbered]
    if missing:
        raise DsftError(f"--model {path}: shard pytorch_model-{missing[0]:05d}-of-{total:05d}.bin is missing"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; download it")
    return [path / f"pytorch_model-{k:05d}-of-{total:05d}.bin" for k in range(1, total + 1)]


def _load(shard: Path) -> dict[str, Any]:
    """A shard's tensors through torch's restricted unpickler; memory-mapped when it is a zip archive (the
    format since torch 1.6), read whole when it is the legacy format (mmap cannot read it)."""
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(shard, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(shard))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise DsftError(f"{shard}: not a plain tensor file ({str(e).splitlines()[0][:160]}); dsft loads only tensors "
                        "(torch.load weights_only) and never unpickles other objects") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DsftError(f"{shard}: holds no state dict of tensors; not a model weights file")
    return state


def _copied(src: Path, shards: list[Path]) -> tuple[list[Path], list[str]]:
    """(the checkpoint's other files to copy: config, tokenizer, generation config, ...; the files left out).
    Weight files of any kind are never copied, so nothing can land on a converted shard, its index or the
    record."""
    copy, skipped = [], []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f in shards or f.name in (BIN_INDEX, RECORD):
            continue
        if f.suffix in (".bin", ".safetensors", ".pt", ".pth") or f.name == "model.safetensors.index.json":
            skipped.append(f.name)
        else:
            copy.append(f)
    return copy, skipped


def convert(src: Path, out: Path, force: bool = False) -> dict[str, Any]:
    from safetensors.torch import save_file

    if not (src / "config.json").is_file():
        raise DsftError(f"--model {src}: no config.json; point it at the checkpoint directory")
    if (src / "model.safetensors").is_file() or (src / "model.safetensors.index.json").is_file():
        raise DsftError(f"--model {src}: already has safetensors weights; dsft loads it as it is")
    shards = pickle_shards(src)
    if not shards:
        raise DsftError(f"--model {src}: no pytorch_model*.bin weights to convert")
    out = resolve_output(out, "--out")
    check_location(out, "--out", {"checkpoint (--model)": [src]}, replaceable=True)
    check_replaceable(out, RECORD, "a converted checkpoint", force)
    tied = bool(read_json(src / "config.json").get("tie_word_embeddings", False))
    copy, skipped = _copied(src, shards)
    with staged(out, recheck=lambda: check_replaceable(out, RECORD, "a converted checkpoint", force)) as tmp:
        weight_map = _write_shards(shards, tmp, tied, save_file)
        for f in copy:
            shutil.copy2(f, tmp / f.name)
        if len(set(weight_map.values())) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        record = {"source": str(src.resolve()), "shards": sorted(set(weight_map.values())), "tensors": len(weight_map),
                  "converted": [s.name for s in shards], "not_copied": skipped}
        record["files"] = sorted({*written_files(tmp), RECORD})
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _write_shards(shards: list[Path], tmp: Path, tied: bool, save_file: Any) -> dict[str, str]:
    """Each shard as safetensors. A tensor in two shards, or in another shard than the index says, is
    refused: which copy a loader would take is not defined."""
    weight_map: dict[str, str] = {}
    origin: dict[str, str] = {}
    single = len(shards) == 1
    index = shards[0].parent / BIN_INDEX
    listed = read_json(index)["weight_map"] if index.is_file() else None
    for i, shard in enumerate(shards, start=1):
        state = _load(shard)
        twice = next((k for k in state if k in origin), None)
        if twice is not None:
            raise DsftError(f"{shard}: tensor {twice} is also in {origin[twice]}; a release holds each tensor once: "
                            "re-download the shards")
        origin.update(dict.fromkeys(state, shard.name))
        if listed is not None:
            wrong = next((k for k in state if listed.get(k) != shard.name), None)
            if wrong is not None:
                raise DsftError(f"{shard}: holds {wrong}, which {BIN_INDEX} places in {listed.get(wrong) or 'no shard'}; "
                                "the index and the shards disagree: re-download them")
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
    absent = sorted(set(listed or {}) - set(origin))
    if absent:
        raise DsftError(f"{index}: lists {absent[0]} (and {len(absent) - 1} more) in {listed[absent[0]]}, which does not "
                        "hold it; re-download that shard")
    return weight_map
