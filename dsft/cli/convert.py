"""`dsft convert`: a checkpoint rewritten for stock tools: pickle `.bin` weights as safetensors (without unpickling
anything but tensors), or an FP8 block-scaled release (DeepSeek-V3/R1) with its weights dequantized."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import OutOpt, errors_exit_2


@errors_exit_2
def convert(
    model: Annotated[Path, typer.Option("--model", "-m", help="A checkpoint directory: pytorch_model*.bin weights, or "
                                        "an FP8 block-scaled release.", show_default=False)],
    out: OutOpt,
    dtype: Annotated[str, typer.Option("--dtype", help="FP8 releases: the dtype the weights are dequantized to "
                                       "(bfloat16, or float32 to keep every bit of FP8 x scale).")] = "bfloat16",
    force: Annotated[bool, typer.Option("--force", help="Replace a directory an earlier `dsft convert` wrote.")] = False,
) -> None:
    """Rewrite a `.bin`-only checkpoint as safetensors (torch.load weights_only: tensors only), shard by shard; or
    dequantize an FP8 block-scaled checkpoint (exact partial edge blocks) for stock transformers and PEFT."""
    from dsft.export.dequantize import is_fp8

    if is_fp8(model):
        from dsft.export.dequantize import dequantize_checkpoint

        record = dequantize_checkpoint(model, out, dtype, force)
        typer.echo(f"{out}: {record['tensors']} tensors in {len(record['shards_sha256'])} safetensors shards, FP8 weights "
                   f"dequantized to {dtype} (from {model}; dsft-convert.json); load it with "
                   f"AutoModelForCausalLM.from_pretrained(\"{out}\")")
        return
    if dtype != "bfloat16":
        from dsft.errors import DsftError

        raise DsftError(f"--dtype {dtype}: only an FP8 checkpoint is dequantized; a .bin checkpoint keeps its dtype")
    from dsft.models.convert import convert as run_convert

    record = run_convert(model, out, force)
    typer.echo(f"{out}: {record['tensors']} tensors in {len(record['shards'])} safetensors shards "
               f"(from {model}; dsft-convert.json)")
    if record["not_copied"]:
        typer.echo(f"not copied (weight files that are not the release's .bin shards): {', '.join(record['not_copied'])}")
