"""`dsft convert` on an FP8 block-scaled checkpoint (DeepSeek-V3/R1 as released): the same checkpoint with every
FP8 weight dequantized, for tools that load it with stock transformers (PEFT on dsft's `--format peft` export).

Stock transformers cannot do this itself: on CPU its FP8 dequantization mis-scales a weight whose shape is
not a multiple of the scale grid (silently, on the tiny V3's 40-row `kv_a_proj_with_mqa`) or refuses it (V3's
own 576-row one), and on a GPU it keeps FP8 modules to which PEFT adds LoRA before the block scale
(dsft.export.peft). Here each FP8 weight is multiplied by its
`weight_scale_inv` tile by tile, edge tiles partial (dsft.models.fp8, the merge's writer with no adapter),
shard by shard with the release's shard names; every other tensor (norms, routers, the MTP layer's) is
copied as it is; config.json loses its quantization_config (dsft.models.fp8.dequantized_config); the index,
tokenizer and other files follow. Written beside `--out` and renamed at the end, with a record
(`dsft-convert.json`) so that --force replaces only a conversion dsft wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dsft.adapters.weights import Adapter
from dsft.errors import DsftError
from dsft.export.merge import ShardWriter, check_free_space, output_bytes, write_index
from dsft.export.safetensors_io import ByteMeter, read_header
from dsft.models.convert import RECORD
from dsft.models.fp8 import block_size, dequantized_config
from dsft.models.stream import shard_files
from dsft.outputs import check_location, check_replaceable, resolve_output, staged, written_files

DTYPES = {"bfloat16": "BF16", "float32": "F32"}
INDEX = "model.safetensors.index.json"


def is_fp8(model: Path) -> bool:
    config = model / "config.json"
    return config.is_file() and block_size(json.loads(config.read_text())) is not None


def dequantize_checkpoint(src: Path, out: Path, dtype: str = "bfloat16", force: bool = False,
                          progress: bool = True) -> dict[str, Any]:
    """Write `src` with its FP8 weights dequantized to `dtype` at `out`; returns the record."""
    from dsft.console import track

    if dtype not in DTYPES:
        raise DsftError(f"--dtype: must be one of {', '.join(DTYPES)} (got {dtype!r})")
    config = json.loads((src / "config.json").read_text())
    block = block_size(config)
    if block is None:
        raise DsftError(f"--model {src}: not an FP8 block-scaled checkpoint (no quantization_config with quant_method "
                        "fp8); dsft loads it as it is")
    out = resolve_output(out, "--out")
    check_location(out, "--out", {"checkpoint (--model)": [src]}, replaceable=True)
    check_replaceable(out, RECORD, "a converted checkpoint", force)
    shards = shard_files(src)
    writer = ShardWriter(Adapter(), "bf16", block, ByteMeter(), dequantized=DTYPES[dtype])
    headers = {s.name: read_header(s)[0] for s in shards}
    check_free_space(out, sum(output_bytes(writer, h) for h in headers.values()))
    with staged(out, recheck=lambda: check_replaceable(out, RECORD, "a converted checkpoint", force)) as tmp:
        digests = {}
        for shard in track(shards, description="dequantizing shards", unit="shards", disable=not progress):
            digests[shard.name] = writer.write(shard, tmp / shard.name)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX, "config.json", RECORD):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(dequantized_config(config, dtype), indent=2) + "\n")
        if (src / INDEX).is_file():
            write_index(src / INDEX, tmp / INDEX, writer, headers)
        tensors = sum(len(writer.plan(h)) for h in headers.values())
        record = {"source": str(src.resolve()), "dequantized_to": dtype, "fp8_block": list(block), "tensors": tensors,
                  "shards_sha256": digests}
        record["files"] = sorted({*written_files(tmp), RECORD})
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
