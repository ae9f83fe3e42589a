"""`dsft merge`: write base + adapter as a checkpoint in the base's own layout, shard by shard.

Built from the ORIGINAL base checkpoint (never from dequantized NF4). Each output shard has the base
shard's tensor names, shapes, dtypes and order; tensors the adapter does not touch are copied byte for
byte, touched ones are merged in fp32 and rounded once to their dtype. A shard is streamed tensor by
tensor, so memory stays near the adapter plus a few tensors whatever the model's size. FP8
block-scaled bases are written in bf16 (default) or re-quantized with the same block scheme (`fp8`).
Everything goes to a hidden directory next to `--out`, renamed to it at the end; an interrupted merge
keeps its finished shards there and the same command continues it (dsft.export.partial).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsft.errors import DsftError
from dsft.adapters.weights import Adapter, read_adapter
from dsft.export.adapter import merged, merged_rows, retention_sums
from dsft.export.partial import PROGRESS, PartialOutput, fingerprint
from dsft.export.safetensors_io import (
    DTYPES, ByteMeter, build_header, copy_bytes, iter_entries, read_header, read_tensor, tensor_bytes,
)
from dsft.arch import canonical, missing_engine_keys
from dsft.models.fp8 import block_size, dequantize, dequantized_config, quantize
from dsft.models.identity import check_base
from dsft.arch import FUSED, PER_EXPERT
from dsft.models.stream import SCALE_SUFFIX, shard_files
from dsft.outputs import (
    check_free, check_location, check_replaceable, human_size, resolve_output, written_files,
)

WEIGHT_FILES = ("model.safetensors.index.json",)
FP8 = ("F8_E4M3", "F8_E5M2")


@dataclass
class Source:
    adapter_dir: Path
    base: Path
    run: Path | None
    recipe: dict[str, Any] | None
    base_key: str = "--base"  # where the base came from, named in its errors
    checkpoint: Path | None = None  # --adapter was one of the run's checkpoints (RUN/checkpoints/checkpoint-N)


def resolve(adapter_arg: Path, base: Path | None) -> Source:
    """`--adapter` may be a run directory (RUN/adapter inside), one of its checkpoints, or an adapter directory; the base is
    `--base`, else the run's recipe.yaml, else a local base_model_name_or_path of a plain PEFT adapter.
    The adapter's files and the base's config and shard headers are checked before anything is read."""
    from dsft.adapters.weights import check_adapter_dir
    from dsft.models.files import model_dir_error
    from dsft.config.load import load_run_recipe
    from dsft.models.load import resolve_model_path
    from dsft.runs.run_dir import adapter_source

    run, adapter_dir, checkpoint = adapter_source(adapter_arg, "--adapter", "use")
    config = check_adapter_dir(adapter_dir)
    recipe = load_run_recipe(run).model_dump(mode="json") if run else None
    key = "--base"
    if base is None:
        if recipe:
            base = resolve_model_path(recipe["model"]["path"], recipe["model"].get("revision"))
            key = f"{run / 'recipe.yaml'}: model.path"
        else:
            name = config.get("base_model_name_or_path")
            if not isinstance(name, str) or not Path(name).is_dir():
                raise DsftError(f"--adapter {adapter_arg}: no run recipe names the base model; pass --base /path/to/checkpoint")
            base = Path(name)
    model_dir_error(Path(base), key, tokenizer=False)
    return Source(adapter_dir, Path(base), run, recipe, key, checkpoint)


def read_checked(source: Source, force: bool) -> Adapter:
    """The adapter, read once its recorded base is this base (the architecture always, the weights unless
    --force), and checked against this base's config."""
    from dsft.adapters.metadata import read_metadata
    from dsft.models.check import check_checkpoint

    recorded = read_metadata(source.adapter_dir).get("base_model")
    check_base(recorded, source.base, source.base_key, weights=False)  # another model is named as such first,
    check_checkpoint(source.base, source.base_key)  # a damaged base as damaged, then other weights as other weights
    check_base(recorded, source.base, source.base_key, force, "pass --force to apply the adapter to this checkpoint anyway")
    return read_adapter(source.adapter_dir, "--adapter", json.loads((source.base / "config.json").read_text()))


def check(source: Source, adapter: Adapter, shards: list[Path]) -> dict[str, dict[str, Any]]:
    """Every adapter target against the base's headers, before anything is written."""
    headers = {shard.name: read_header(shard)[0] for shard in shards}
    keys = {canonical(k): h[k] for h in headers.values() for k in h if k != "__metadata__"}
    missing = [k for k in adapter.targets() if k not in keys]
    missing += [m for m in adapter.experts if not any(k.startswith(m + ".") for k in keys)]
    if missing:
        raise DsftError(f"--base {source.base} has no tensor {missing[0]} (and {len(missing) - 1} more) that the adapter "
                        "changes: the adapter is for another architecture or checkpoint")
    for key, (a, b, _) in adapter.linear.items():
        if list(keys[key]["shape"]) != [b.shape[0], a.shape[1]]:
            raise DsftError(f"--base {source.base}: {key} is {keys[key]['shape']}, the adapter expects "
                            f"{[b.shape[0], a.shape[1]]}: another architecture or size")
    for key, tensor in adapter.replace.items():
        if list(keys[key]["shape"]) != list(tensor.shape):
            raise DsftError(f"--base {source.base}: {key} is {keys[key]['shape']}, the adapter's trained copy is "
                            f"{list(tensor.shape)}: another architecture or size")
    return headers


class ShardWriter:
    """Writes one output shard per base shard. FP8 bases: with `dtype="bf16"` every FP8 weight is
    dequantized (and merged where touched) to bf16; with `"fp8"` the unit of precision is one Linear, or one
    layer's routed experts (transformers' FP8 experts and vLLM's FusedMoE quantize them together): an
    untouched unit stays FP8 byte for byte with its scales, a touched unit is written in bf16 (declared
    unquantized in config.json), or re-quantized to FP8 with `requantize`. Every touched tensor adds to
    the retention sums: how much of the fine-tune's delta the written values carry."""

    def __init__(self, adapter: Adapter, dtype: str, fp8_block: tuple[int, int] | None, meter: ByteMeter,
                 requantize: bool = False, dequantized: str = "BF16") -> None:
        self.adapter, self.dtype, self.block, self.meter = adapter, dtype, fp8_block, meter
        self.dequantized = dequantized  # the dtype FP8 weights are written in when they are not kept FP8
        self.requantize = requantize
        self.touched = 0
        self.dot = self.norm2 = 0.0

    def unit(self, name: str) -> str:
        """The unit of precision a weight belongs to: its Linear, or its layer's routed experts."""
        key = canonical(name)
        m = PER_EXPERT.match(key) or FUSED.match(key)
        return m.group("module") if m else key.removesuffix(".weight")

    def unit_touched(self, name: str) -> bool:
        key = canonical(name)
        m = PER_EXPERT.match(key) or FUSED.match(key)
        return m.group("module") in self.adapter.experts if m else self.adapter.touches(name)

    def plan(self, header: dict[str, Any]) -> list[tuple[str, str, list[int], str]]:
        """(name, output dtype, shape, action) per tensor in file order; action is copy, merge,
        dequant (FP8 -> bf16, merged if touched), requant (FP8 re-quantized) or scale (its new scales)."""
        out = []
        for name, e in iter_entries(header):
            weight = name.removesuffix(SCALE_SUFFIX)
            if name.endswith(SCALE_SUFFIX):
                if self.dtype != "fp8" or (self.unit_touched(weight) and not self.requantize):
                    continue  # its weight is written in bf16
                out.append((name, e["dtype"], e["shape"], "scale" if self.adapter.touches(weight) else "copy"))
            elif e["dtype"] in FP8:
                if self.dtype != "fp8" or (self.unit_touched(name) and not self.requantize):
                    out.append((name, self.dequantized, e["shape"], "dequant"))
                else:
                    out.append((name, e["dtype"], e["shape"], "requant" if self.adapter.touches(name) else "copy"))
            else:
                out.append((name, e["dtype"], e["shape"], "merge" if self.adapter.touches(name) else "copy"))
        return out

    def bf16_units(self, header: dict[str, Any]) -> set[str]:
        """Units of an FP8 output written in bf16 (config.json declares them unquantized)."""
        if self.dtype != "fp8":
            return set()
        return {self.unit(n) for n, _, _, action in self.plan(header) if action == "dequant"}

    def write(self, src: Path, dst: Path) -> str:
        header, data_start = read_header(src)
        plan = self.plan(header)
        raw, sizes = build_header([(n, d, s) for n, d, s, _ in plan], header.get("__metadata__"))
        digest = hashlib.sha256(raw)
        requantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with src.open("rb") as fi, dst.open("wb") as fo:
            fo.write(raw)
            for (name, dtype, _, action), size in zip(plan, sizes):
                entry = header[name]
                if action == "copy":
                    start, end = entry["data_offsets"]
                    copy_bytes(fi, fo, data_start + start, end - start, self.meter, digest)
                    continue
                tensor = self._compute(name, action, header, data_start, fi, requantized, DTYPES[dtype])
                data = tensor_bytes(tensor.to(DTYPES[dtype]))
                assert len(data) == size, name
                self.meter.hold(len(data))
                fo.write(data)
                digest.update(data)
                self.meter.release(len(data))
        return digest.hexdigest()

    def _compute(self, name: str, action: str, header: dict[str, Any], data_start: int, fi: Any,
                 requantized: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
        if action in ("scale", "requant"):
            weight = name.removesuffix(SCALE_SUFFIX)
            if weight not in requantized:
                requantized[weight] = self._requant(weight, header, data_start, fi)
            return requantized[weight][1 if action == "scale" else 0]
        base = self._read(fi, header[name], data_start)
        scale = self._read(fi, header[name + SCALE_SUFFIX], data_start) if action == "dequant" else None
        if not self.adapter.touches(name):
            return base if scale is None else dequantize(base, scale, self.block)
        self.touched += 1
        rows = merged_rows(name, base, self.adapter, dtype, fp8=None if scale is None else (scale, self.block))
        if rows is not None:  # a LoRA'd Linear, merged (and dequantized) a block of rows at a time
            written, dot, norm2 = rows
            self._retained(dot, norm2)
            self.meter.transient(written.numel() * written.element_size())
            return written
        if scale is not None:
            base = dequantize(base, scale, self.block)
        result = merged(name, base, self.adapter)
        written = result.to(dtype)
        self._retained(*retention_sums(base, result, written))
        self.meter.transient(result.numel() * 4)
        return written

    def _retained(self, dot: float, norm2: float) -> None:
        self.dot, self.norm2 = self.dot + dot, self.norm2 + norm2

    def _read(self, fi: Any, entry: dict[str, Any], data_start: int) -> torch.Tensor:
        t = read_tensor(fi, entry, data_start)
        self.meter.transient(t.numel() * t.element_size())
        return t

    def _requant(self, weight: str, header: dict[str, Any], data_start: int, fi: Any) -> tuple[torch.Tensor, torch.Tensor]:
        base = dequantize(self._read(fi, header[weight], data_start),
                          self._read(fi, header[weight + SCALE_SUFFIX], data_start), self.block)
        self.touched += 1
        result = merged(weight, base, self.adapter)
        q, grid = quantize(result, self.block)
        self._retained(*retention_sums(base, result, dequantize(q, grid, self.block)))
        return q, grid


def retention(dot: float, norm2: float) -> float | None:
    """The share of the fine-tune's delta the written weights carry, in the least-squares sense:
    <written - base, delta> / |delta|^2 (1.0 when nothing is lost; rounding noise averages out)."""
    return dot / norm2 if norm2 > 0 else None


def merge(source: Source, out: Path, force: bool = False, dtype: str = "bf16", meter: ByteMeter | None = None,
          progress: bool = True, requantize: bool = False) -> dict[str, Any]:
    """Write the merged checkpoint to `out`; returns what dsft-merge.json records."""
    from dsft.console import console as dsft_console

    import dsft

    out = resolve_output(out, "--out")
    check_out(out, source, force)
    adapter = read_checked(source, force)
    shards = shard_files(source.base)
    headers = check(source, adapter, shards)
    config = json.loads((source.base / "config.json").read_text())
    block = block_size(config)
    if dtype == "fp8" and block is None:
        raise DsftError(f"--dtype fp8: {source.base} is not an FP8 block-scaled checkpoint; leave --dtype at bf16")
    if requantize and dtype != "fp8":
        raise DsftError("--requantize: re-quantizes touched FP8 weights, so it needs --dtype fp8")
    meter = meter or ByteMeter()
    meter.hold(adapter.nbytes)
    writer = ShardWriter(adapter, dtype, block, meter, requantize)
    inputs = [*shards, *(f for f in source.adapter_dir.iterdir() if f.is_file())]
    key = fingerprint(inputs, dtype=dtype, requantize=requantize, dsft_version=dsft.__version__)
    console = dsft_console(stderr=True, quiet=not progress)
    with PartialOutput(out, key, recheck=lambda: check_out(out, source, force)) as partial:
        if partial.done:
            console.print(f"continuing an interrupted merge into {out}: {len(partial.done)} of {len(shards)} shards "
                          "already written")
        todo = [s for s in shards if s.name not in partial.done]
        check_free_space(out, sum(output_bytes(writer, headers[s.name]) for s in todo))
        _merge_shards(shards, todo, writer, partial, console, progress)
        bf16_units = sorted(set().union(*(writer.bf16_units(h) for h in headers.values())))
        engine_gaps = missing_engine_keys(config)
        if engine_gaps:
            console.print(f"warning: {source.base}/config.json (copied to the merged model) lacks {', '.join(engine_gaps)}, "
                          "which vLLM / llama.cpp read for this architecture: add them from the release's config.json")
        _write_side_files(source, partial.dir, headers, writer, config, block is not None and dtype != "fp8", bf16_units)
        record = _record(source, adapter, shards, partial, dtype if block else "base", requantize,
                         bf16_units if dtype == "fp8" else [], engine_gaps)
        record["files"] = sorted({*(n for n in written_files(partial.dir) if n != PROGRESS), MERGE_RECORD})
        (partial.dir / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        partial.finish()
    return record


def _merge_shards(shards: list[Path], todo: list[Path], writer, partial, console, progress: bool) -> None:
    """Merge each shard not yet done; stopped (an error, Ctrl-C), the finished shards stay as resume state."""
    from dsft.console import track

    try:
        for shard in track(shards, description="merging shards", unit="shards", disable=not progress):
            if shard.name not in partial.done:
                before = (writer.touched, writer.dot, writer.norm2)
                digest = writer.write(shard, partial.part(shard.name))
                partial.record(shard.name, sha256=digest, touched=writer.touched - before[0],
                               dot=writer.dot - before[1], norm2=writer.norm2 - before[2])
    except BaseException:
        for shard in todo:  # the unfinished shard: only its finished neighbours are resume state
            partial.part(shard.name).unlink(missing_ok=True)
        kept = sum((partial.dir / n).stat().st_size for n in partial.done if (partial.dir / n).is_file())
        console.print(f"merge stopped after {len(partial.done)} of {len(shards)} shards; the finished ones "
                      f"({human_size(kept)}) are kept in {partial.dir}: run the same command again to continue, "
                      "or delete that directory")
        raise


def _record(source: Source, adapter, shards: list[Path], partial, dtype: str, requantize: bool, bf16_units: list,
            engine_gaps: list[str]) -> dict[str, Any]:
    """What dsft-merge.json records (its file list aside)."""
    import dsft

    done = partial.done.values()
    return {"dsft_version": dsft.__version__, "base": str(source.base.resolve()),
            "adapter": str(source.adapter_dir.resolve()), "run": str(source.run.resolve()) if source.run else None,
            "dtype": dtype, "requantize": requantize,
            "touched_tensors": sum(d["touched"] for d in done),
            "retention": retention(sum(d.get("dot", 0.0) for d in done), sum(d.get("norm2", 0.0) for d in done)),
            "bf16_units": bf16_units,
            "size_bytes": {"base": sum(s.stat().st_size for s in shards),
                           "merged": sum((partial.dir / s.name).stat().st_size for s in shards)},
            "machine": machine(), "config_missing_engine_keys": engine_gaps,
            "routed_experts": adapter.meta.get("routed_experts"),
            "shards_sha256": {s.name: partial.done[s.name]["sha256"] for s in shards}}


MERGE_RECORD = "dsft-merge.json"


def check_out(out: Path, source: Source, force: bool) -> None:
    """`--out` may not be or hold the base, the adapter or its run, nor lie inside a checkpoint; an
    existing one is replaced only with --force and only when dsft's merge wrote it."""
    inputs = {"run being merged (--adapter)": [source.run] if source.run else [],
              "adapter (--adapter)": [source.adapter_dir], "base checkpoint": [source.base]}
    check_location(out, "--out", inputs, replaceable=True)
    check_replaceable(out, MERGE_RECORD, "a merged checkpoint", force)


def output_bytes(writer: "ShardWriter", header: dict[str, Any]) -> int:
    return sum(DTYPES[dtype].itemsize * int(torch.Size(shape).numel()) for _, dtype, shape, _ in writer.plan(header))


def check_free_space(out: Path, needed: int) -> None:
    """Room for the shards still to write, plus 2% and 16 MiB for headers and side files."""
    check_free(out.parent, int(needed * 1.02) + 16 * 2**20, "--out",
               f"--out {out}: the merged checkpoint needs about {{size}} free")


def machine() -> dict[str, str]:
    """Where the merge ran: verify expects bit-equal tensors there (the same kernels round alike), 1 ulp elsewhere."""
    import platform

    return {"platform": platform.platform(), "machine": platform.machine(), "torch": torch.__version__}


def _write_side_files(source: Source, tmp: Path, headers: dict[str, dict[str, Any]], writer: ShardWriter,
                      config: dict[str, Any], to_bf16: bool, bf16_units: list[str]) -> None:
    """config (without FP8 quantization when writing bf16), index, generation config, tokenizer and the
    checkpoint's other files; the run's chat template when it trained with its own."""
    for f in source.base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (*WEIGHT_FILES, "config.json"):
            shutil.copy2(f, tmp / f.name)
    if to_bf16:
        config = dequantized_config(config)
    elif bf16_units:  # FP8 output: touched units are bf16; both keys, as transformers and vLLM read them
        quant = config["quantization_config"]
        for key in ("modules_to_not_convert", "ignored_layers"):
            quant[key] = sorted(set(quant.get(key) or []) | set(bf16_units))
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = source.base / "model.safetensors.index.json"
    if index.is_file():
        write_index(index, tmp / index.name, writer, headers)
    template = (source.recipe or {}).get("data", {}).get("chat_template")
    if template and (source.adapter_dir / "chat_template.jinja").is_file():
        shutil.copy2(source.adapter_dir / "chat_template.jinja", tmp / "chat_template.jinja")


def write_index(src: Path, dst: Path, writer: ShardWriter, headers: dict[str, dict[str, Any]]) -> None:
    """The base's shard index for what `writer` writes: its tensors (dropped scales left out) and total size."""
    data = json.loads(src.read_text())
    weight_map, total = {}, 0
    for shard, header in headers.items():
        for name, dtype, shape, _ in writer.plan(header):
            weight_map[name] = shard
            total += DTYPES[dtype].itemsize * int(torch.Size(shape).numel())
    data["weight_map"] = dict(sorted(weight_map.items()))
    data.setdefault("metadata", {})["total_size"] = total
    dst.write_text(json.dumps(data, indent=2) + "\n")
