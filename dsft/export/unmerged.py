"""`dsft export`: a run's adapter written unmerged in the layout another tool loads (`vllm`: vLLM's LoRA
loader, dsft.export.vllm; `peft`: stock PEFT on a stock transformers base, dsft.export.peft).

One writer for every format: the adapter read and checked against the base (dsft.export.merge.read_checked),
the format's refusals, its tensors and adapter_config.json, the run's tokenizer files, the format's own
`check` on the staged directory (an export that would not load as intended is never renamed into place),
and a record (`dsft-export.json`) of what dsft wrote, so that only dsft's own export is ever replaced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dsft.errors import DsftError
from dsft.export.merge import Source, read_checked
from dsft.outputs import check_location, check_replaceable, resolve_output, staged, written_files

RECORD = "dsft-export.json"
WEIGHTS = "adapter_model.safetensors"
FORMATS = ("peft", "vllm")


def _format(name: str) -> Any:
    if name == "vllm":
        from dsft.export import vllm

        return vllm
    from dsft.export import peft

    return peft


def export(source: Source, out: Path, fmt: str, force: bool = False) -> dict[str, Any]:
    """Write the adapter of `source` for `fmt` at `out`; the record of what was written."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise DsftError(f"--format: must be one of {', '.join(FORMATS)} (got {fmt!r}); other tools load `dsft merge` output")
    module = _format(fmt)
    inputs = {"run being exported (--adapter)": [source.run] if source.run else [], "adapter (--adapter)": [source.adapter_dir],
              "base checkpoint": [source.base]}
    out = resolve_output(out, "--out")
    check_location(out, "--out", inputs)
    check_replaceable(out, RECORD, "an export", force)
    config = json.loads((source.base / "config.json").read_text())
    adapter = read_checked(source, force)
    module.refuse(adapter, config)
    tensors, adapter_config, facts = module.build(adapter, config, str(source.base))
    with staged(out, recheck=lambda: check_replaceable(out, RECORD, "an export", force)) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        for f in source.adapter_dir.iterdir():  # the tokenizer and chat template the run trained with
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(f, tmp / f.name)
        problems = module.check(tmp, source.base)
        if problems:
            raise DsftError(f"--format {fmt}: the export would not load as intended: {problems[0]}")
        record = {"format": fmt, "run": str(source.run) if source.run else None, "adapter": str(source.adapter_dir),
                  "base": str(source.base), "tensors": len(tensors), "adapted_expert_layers": sorted(adapter.experts),
                  **facts}
        record["files"] = sorted({*written_files(tmp), RECORD})
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
