"""`dsft merge --verify`: prove the merge exactly, then measure the merged model.

1. Exact check, streamed tensor by tensor over the merged shards. The reference is the adapter as PEFT
   and dsft load it for training and eval (`load_lora` on a hollow copy of the base: its weights are
   zero-stride views, so only the adapter takes memory), never the merge's own key mapping, which would
   share its bugs: each touched tensor must equal W + s B A (or the trained whole weight) computed in
   fp32 from the base file (FP8 dequantized by dsft, edge tiles partial) and rounded once to the dtype
   the output stores it in; bit-equal where the merge ran (the same kernels round alike), within one unit
   in the last place elsewhere. Untouched tensors: byte-identical, or the base rounded once where an FP8
   base is written in bf16. The merged file must name exactly the expected tensors.
2. Logit check, all three models in fp32 on the run's prompts: the adapter model (A), an in-memory merge
   of the same reference rounded once as the output stores it (F, the floor: what rounding alone costs),
   and the merged checkpoint as written (M). M's mean |logit gap| to A must be within 2x F's (plus a
   1e-6 relative floor for fp32 files, where F's gap is reduction order only), and M must route at least
   as many tokens to A's top-k experts as F does. The mean and the top-k share are used rather than the
   maximum, which one near-tie routing flip dominates in an MoE.

The verdict and figures go into dsft-merge.json (`verify`). `layers` limits the logit check's models to
their first layers, for checkpoints too big to load three times; the exact check always covers every tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsft.export.adapter import retention_sums
from dsft.export.merge import MERGE_RECORD, Source, machine
from dsft.export.safetensors_io import read_header, read_tensor
from dsft.arch import canonical, selects
from dsft.models.fp8 import block_size, dequantize
from dsft.models.fp8 import quantize as quantize_fp8
from dsft.arch import FUSED, LAYER, PER_EXPERT
from dsft.models.stream import SCALE_SUFFIX, shard_files
from dsft.outputs import write_atomic
from dsft.moe.routing import routers

FLOAT_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
              torch.float8_e4m3fn: torch.int8, torch.float8_e5m2: torch.int8}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
GAP_FACTOR = 2.0
FP32_FLOOR = 1e-6


# ---------------------------------------------------------------- the reference: the adapter as loaded

@dataclass
class Reference:
    linear: dict[str, torch.Tensor] = field(default_factory=dict)    # weight key -> delta [out, in], fp32
    replace: dict[str, torch.Tensor] = field(default_factory=dict)   # weight key -> trained whole weight
    experts: dict[str, Any] = field(default_factory=dict)            # experts module -> (ids, ExpertDelta | None, ExpertReplacement | None)


def _hollow(model: nn.Module) -> None:
    """Every meta parameter as a zero-stride CPU view: modules see shapes and dtypes, nothing is allocated."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False)


def reference(source: Source) -> Reference:
    """What the adapter changes, read from the modules `load_lora` attaches (PEFT's own scaling, rank and
    alpha patterns, dsft's expert LoRA with the experts recorded in dsft_adapter.json)."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    from dsft.adapters.lora import load_lora
    from dsft.models.stream import StreamLoader
    from dsft.moe.experts import replace_experts
    from dsft.moe.lora import ExpertLoraLayer

    model = StreamLoader(source.base, torch.float32, False, torch.device("cpu"), "eager").skeleton()
    _hollow(model)
    replace_experts(model, quantized=False, dtype=torch.float32)  # as the loader holds them: DsftExperts
    peft_model = load_lora(model, str(source.adapter_dir))
    ref = Reference()
    for name, module in peft_model.named_modules():
        key = name.removeprefix("base_model.model.")
        if isinstance(module, ExpertLoraLayer):
            full = "default" in module.lora_full_gate_up
            ref.experts[key] = (module.lora_experts["default"], None if full else module.delta("default"),
                                module.replacement("default") if full else None)
        elif isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
            ref.linear[key + ".weight"] = module.get_delta_weight("default").detach().float()
        elif isinstance(module, ModulesToSaveWrapper) and "default" in module.modules_to_save:
            ref.replace[key + ".weight"] = module.modules_to_save["default"].weight.detach().float()
    return ref


def touches(ref: Reference, key: str) -> bool:
    return selects(key, ref.linear.keys() | ref.replace.keys(), {m: v[0] for m, v in ref.experts.items()})


def _expert_rows(proj: str, inter: int) -> slice:
    return slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)


def expected(key: str, base: torch.Tensor, ref: Reference) -> torch.Tensor | None:
    """The merged value of checkpoint tensor `key` in fp32 (None: the adapter does not touch it)."""
    name = canonical(key)
    if name in ref.replace:
        return ref.replace[name].clone()
    if name in ref.linear:
        return base.float() + ref.linear[name]
    m = PER_EXPERT.match(name) or FUSED.match(name)
    if not m or m.group("module") not in ref.experts:
        return None
    ids, delta, repl = ref.experts[m.group("module")]
    proj = m.group("proj")
    if "expert" in m.groupdict():
        e = int(m.group("expert"))
        return _one_expert(base.float(), e, proj, ids, delta, repl) if e in ids else None
    w = base.float().clone()
    for e in ids:
        if proj == "down_proj":
            w[e] = _one_expert(w[e], e, "down_proj", ids, delta, repl)
        else:
            inter = w.shape[1] // 2
            for part in ("gate_proj", "up_proj"):
                w[e, _expert_rows(part, inter)] = _one_expert(w[e, _expert_rows(part, inter)], e, part, ids, delta, repl)
    return w


def _one_expert(w: torch.Tensor, e: int, proj: str, ids: list[int], delta: Any, repl: Any) -> torch.Tensor:
    if repl is not None:
        i = ids.index(e)
        if proj == "down_proj":
            return repl.down[i].float().clone()
        return repl.gate_up[i][_expert_rows(proj, w.shape[0])].float().clone()
    if proj == "down_proj":
        return w + delta.scale * (delta.down_B[e].float() @ delta.down_A[e].float())
    rows = _expert_rows(proj, w.shape[0])
    return w + delta.scale * (delta.gate_up_B[e][rows].float() @ delta.gate_up_A[e].float())


# ---------------------------------------------------------------- the exact check

class _Files:
    """Tensors of a checkpoint by name, read one at a time."""

    def __init__(self, path: Path) -> None:
        self.index: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for shard in shard_files(path):
            header, start = read_header(shard)
            self.index.update({k: (shard, v, start) for k, v in header.items() if k != "__metadata__"})

    def read(self, key: str) -> torch.Tensor:
        shard, entry, start = self.index[key]
        with shard.open("rb") as f:
            return read_tensor(f, entry, start)

    def value(self, key: str, block: tuple[int, int] | None) -> torch.Tensor:
        """fp32 value of a weight; FP8 dequantized by dsft with its block scales."""
        t = self.read(key)
        if t.dtype in FP8:
            return dequantize(t, self.read(key + SCALE_SUFFIX), block or (128, 128))
        return t.float()


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their dtype (sign-magnitude bits mapped to a monotone order)."""
    bits = FLOAT_BITS[a.dtype]
    width = torch.iinfo(bits).bits

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, -(i & ((1 << (width - 1)) - 1)), i)

    return (ordered(a) - ordered(b)).abs()


@dataclass
class ExactReport:
    touched: int = 0
    untouched: int = 0
    bit_equal: int = 0
    mismatched: list[str] = field(default_factory=list)
    worst: dict[str, Any] = field(default_factory=lambda: {"tensor": None, "ulps": 0, "max_abs": 0.0})
    names: list[str] = field(default_factory=list)  # problems with the set of tensors written
    dot: float = 0.0
    norm2: float = 0.0

    def note(self, key: str, got: torch.Tensor, want: torch.Tensor, limit: int) -> None:
        if got.dtype != want.dtype or got.shape != want.shape:
            self.mismatched.append(f"{key}: {got.dtype} {list(got.shape)}, expected {want.dtype} {list(want.shape)}")
            return
        if got.numel() == 0 or torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got, want.view(
                torch.uint8) if want.element_size() == 1 else want):
            self.bit_equal += 1
            return
        if got.is_floating_point():
            diff = int(ulps(got, want).max())
            gap = float((got.float() - want.float()).abs().max())
        else:
            diff, gap = 1 << 30, float((got.double() - want.double()).abs().max())
        if diff > self.worst["ulps"]:
            self.worst = {"tensor": key, "ulps": diff, "max_abs": gap}
        if diff > limit:
            self.mismatched.append(f"{key}: off by up to {diff} ulp ({gap:.3g})")

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.names

    def summary(self, limit: int) -> dict[str, Any]:
        return {"touched": self.touched, "untouched": self.untouched, "bit_equal": self.bit_equal,
                "ulp_limit": limit, "mismatched": len(self.mismatched), "first_mismatches": self.mismatched[:5],
                "names": self.names[:5], "worst": self.worst,
                "retention": self.dot / self.norm2 if self.norm2 > 0 else None, "ok": self.ok}


def _layer_ok(key: str, layers: int | None) -> bool:
    m = LAYER.search(key)
    return layers is None or m is None or int(m.group(1)) < layers


def exact_check(source: Source, out: Path, record: dict[str, Any], ref: Reference,
                floor: nn.Module | None = None) -> dict[str, Any]:
    """Every tensor of the merged checkpoint against the reference; writes the rounded reference values into
    `floor` (the fp32 base model) as it goes, which makes it the in-memory merge the logit check needs."""
    base, merged = _Files(source.base), _Files(out)
    config = json.loads((source.base / "config.json").read_text())
    block = block_size(config)
    limit = 0 if record.get("machine") == machine() else 1
    report = ExactReport()
    expected_names = {k for k in base.index if not (k.endswith(SCALE_SUFFIX) and _dropped_scale(k, base, merged))}
    missing, extra = sorted(expected_names - set(merged.index)), sorted(set(merged.index) - expected_names)
    report.names = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in extra]
    params = dict(floor.named_parameters()) if floor is not None else {}
    kept = floor.config.num_hidden_layers if floor is not None else None  # the MTP layer is not loaded
    for key in sorted(k for k in merged.index if k in base.index):
        got = merged.read(key)
        if key.endswith(SCALE_SUFFIX):
            if not touches(ref, key.removesuffix(SCALE_SUFFIX)):
                report.note(key, got, base.read(key), 0)  # an FP8 weight kept as it was keeps its scales
            continue  # a re-quantized weight's new scales are checked with it
        w = base.value(key, block) if base.read(key).is_floating_point() else base.read(key)
        want = expected(key, w, ref)
        stored = got.dtype
        if want is None:
            report.untouched += 1
            raw = base.read(key)
            if raw.dtype == stored:
                report.note(key, got, raw, 0)  # copied byte for byte
                value = None
            else:
                value = w.to(stored)  # an FP8 base weight written in bf16: rounded once
                report.note(key, got, value, limit)
        else:
            report.touched += 1
            if stored in FP8:  # re-quantized (--requantize): the scale is checked with its weight
                q, grid = quantize_fp8(want, block)
                report.note(key, got, q, limit)
                report.note(key + SCALE_SUFFIX, merged.read(key + SCALE_SUFFIX), grid, limit)
                written = dequantize(got, merged.read(key + SCALE_SUFFIX), block)
                value = dequantize(q, grid, block)
            else:
                value = want.to(stored)
                report.note(key, got, value, limit)
                written = got.float()
            dot, norm2 = retention_sums(w, want, written)
            report.dot, report.norm2 = report.dot + dot, report.norm2 + norm2
        if value is not None and floor is not None and _layer_ok(key, kept):
            _assign(floor, params, canonical(key), value.float() if value.dtype not in FP8 else dequantize(
                value, merged.read(key + SCALE_SUFFIX), block))
    return report.summary(limit)


def _dropped_scale(key: str, base: _Files, merged: _Files) -> bool:
    """A block scale whose weight the merge wrote in bf16 (so the output has no scale for it)."""
    weight = key.removesuffix(SCALE_SUFFIX)
    return weight in merged.index and merged.index[weight][1]["dtype"] not in ("F8_E4M3", "F8_E5M2")


def _assign(model: nn.Module, params: dict[str, nn.Parameter], name: str, value: torch.Tensor) -> None:
    """Put a checkpoint tensor's value into the fp32 model, per-expert keys into the fused expert weights."""
    m = PER_EXPERT.match(name)
    with torch.no_grad():
        if m:
            module = model.get_submodule(m.group("module"))
            e, proj = int(m.group("expert")), m.group("proj")
            if proj == "down_proj":
                module.down_proj[e].copy_(value)
            else:
                module.gate_up_proj[e, _expert_rows(proj, module.gate_up_proj.shape[1] // 2)].copy_(value)
        elif name in params:
            params[name].copy_(value)


# ---------------------------------------------------------------- the logit check

def _prompts(source: Source, tokenizer: Any, count: int, max_tokens: int = 128) -> list[torch.Tensor]:
    from dsft.evaluate import first_conversations

    data = (source.recipe or {}).get("data", {})
    files = [f for f in (data.get("eval") or data.get("train") or []) if Path(f).is_file()]
    texts: list[str] = []
    if files:  # the first rows only, read streaming
        rows = first_conversations(files, "conversations", data.get("format", "messages"), None, count)
        texts = [tokenizer.apply_chat_template(r, tokenize=False) for r in rows]
    if not texts:
        texts = ["The contract was signed by both parties and", "Explain the rule in one sentence:"][:count]
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens]).unsqueeze(0) for t in texts]


def _run(model: nn.Module, prompts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[int, torch.Tensor]]]:
    device = next(model.parameters()).device
    logits, routes = [], []
    for ids in prompts:
        seen: dict[int, torch.Tensor] = {}
        hooks = [r.register_forward_hook(lambda m, a, o, layer=layer: seen.__setitem__(layer, o[2].sort(-1).values))
                 for layer, r in routers(model).items()]
        with torch.no_grad():
            logits.append(model(ids.to(device)).logits.float().cpu())
        for h in hooks:
            h.remove()
        routes.append({k: v.cpu() for k, v in seen.items()})
    return logits, routes


def _gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    diff = torch.cat([(x - y).abs().flatten() for x, y in zip(a, b)])
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}


def _same_experts(a: list[dict[int, torch.Tensor]], b: list[dict[int, torch.Tensor]]) -> float:
    same = total = 0
    for ra, rb in zip(a, b):
        for layer in ra:
            same += int((ra[layer] == rb[layer]).all(-1).sum())
            total += ra[layer].shape[0]
    return same / total if total else 1.0


def logit_check(adapter: tuple, floor: tuple, merged: tuple) -> dict[str, Any]:
    (a_logits, a_routes), (f_logits, f_routes), (m_logits, m_routes) = adapter, floor, merged
    scale = max(float(torch.cat([x.abs().flatten() for x in a_logits]).max()), 1e-6)
    f_gap, m_gap = _gap(a_logits, f_logits), _gap(a_logits, m_logits)
    f_same, m_same = _same_experts(a_routes, f_routes), _same_experts(a_routes, m_routes)
    limit = GAP_FACTOR * f_gap["mean_abs"] + FP32_FLOOR * scale
    return {"max_abs": m_gap["max_abs"], "mean_abs": m_gap["mean_abs"], "floor_mean_abs": f_gap["mean_abs"],
            "floor_max_abs": f_gap["max_abs"], "mean_limit": limit, "same_topk": m_same, "floor_same_topk": f_same,
            "ok": m_gap["mean_abs"] <= limit and m_same >= f_same}


def verify(source: Source, out: Path, record: dict[str, Any], layers: int | None = None, prompts: int = 4) -> dict[str, Any]:
    """Both checks; the report is also written into OUT/dsft-merge.json under `verify`."""
    from dsft.adapters.lora import load_lora
    from dsft.models.load import device, load_tokenizer
    from dsft.models.stream import load_streaming

    fp32 = lambda path: load_streaming(path, torch.float32, False, device(), "eager", num_layers=layers)  # noqa: E731
    ref = reference(source)
    tokenizer = load_tokenizer(out)
    inputs = _prompts(source, tokenizer, prompts)
    floor_model = fp32(source.base)
    exact = exact_check(source, out, record, ref, floor_model)
    floor = _run(floor_model, inputs)
    del floor_model
    adapter = _run(load_lora(fp32(source.base), str(source.adapter_dir)).eval(), inputs)
    merged = _run(fp32(out), inputs)
    logits = logit_check(adapter, floor, merged)
    report = {"prompts": len(inputs), "layers": layers or "all", "exact": exact, "logits": logits,
              "ok": exact["ok"] and logits["ok"]}
    if (source.recipe or {}).get("model", {}).get("quantization") == "nf4":
        from dsft.config.schema import ModelSection
        from dsft.models.load import load_model

        section = ModelSection(path=str(source.base), dtype="float32", quantization="nf4")
        nf4 = _run(load_lora(load_model(section, source.base), str(source.adapter_dir)).eval(), inputs)
        report["nf4_adapter_vs_merged"] = _gap(nf4[0], merged[0])
    path = out / MERGE_RECORD
    write_atomic(path, json.dumps({**json.loads(path.read_text()), "verify": report}, indent=2) + "\n")
    return report
