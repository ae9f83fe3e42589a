"""Streaming checkpoint loader for MoE models: tensors go straight from the safetensors shards to
their final device and form, one at a time.

- The model skeleton is built on the meta device (buffers real), with transformers' native class.
- Routed experts, per-expert (`mlp.experts.E.gate_proj.weight`, DeepSeek's and Qwen's layout; Mixtral's
  `block_sparse_moe.experts.E.w1.weight` names are mapped, dsft.arch.canonical) or fused
  (`mlp.experts.gate_up_proj`), are assembled one layer at a time in a staging buffer on the target
  device and then become a DsftExperts module (NF4 or plain), so peak memory while loading is the
  final footprint plus about one layer's experts.
- With `nf4`, every other nn.Linear except the router and lm_head becomes a bitsandbytes Linear4bit.
- Block-scaled FP8 weights (`weight` + `weight_scale_inv`, DeepSeek-V3/R1 as released) are
  dequantized tensor by tensor on the way.
- Layers past `num_hidden_layers` (DeepSeek-V3's MTP layer) are skipped.
- With `rest_later` (a model that training.parallel lays out), every parameter outside the routed experts is left a
  placeholder holding no memory, read later as the rank's FSDP2 shard only (dsft.models.shards).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsft.errors import DsftError
from dsft.arch import FUSED, LAYER, PER_EXPERT, canonical  # noqa: F401 - re-exported names
from dsft.models.fp8 import dequantize
from dsft.moe.experts import DsftExperts

SCALE_SUFFIX = "_scale_inv"
NOT_QUANTIZED = ("lm_head", "mlp.gate", "mlp.shared_expert_gate")  # routers and gates stay exact


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    return [path / "model.safetensors"]


dequantize_fp8 = dequantize  # dsft.models.fp8: block-scaled FP8, edge tiles partial


class _ExpertStage:
    """One layer's routed experts, filled expert by expert, then turned into DsftExperts. With a `part` it holds
    (and its loader reads) only that block of the experts."""

    def __init__(self, template: nn.Module, device: torch.device, dtype: torch.dtype,
                 part: tuple[int, int] | None = None) -> None:
        """`part` (index, parts): only that contiguous 1/parts of the experts, held as the module's own rows
        (expert parallelism, dsft.moe.parallel)."""
        e, two_i, h = template.gate_up_proj.shape
        self.act_fn = template.act_fn
        self.num_experts, self.inter, self.part = e, two_i // 2, part
        index, parts = part or (0, 1)
        self.lo, self.hi = index * e // parts, (index + 1) * e // parts
        self.gate_up = torch.empty(self.hi - self.lo, two_i, h, device=device, dtype=dtype)
        self.down = torch.empty(self.hi - self.lo, h, self.inter, device=device, dtype=dtype)
        self.missing = {(i, p) for i in range(self.lo, self.hi) for p in ("gate_proj", "up_proj", "down_proj")}

    def wants(self, expert: int | None) -> bool:
        return expert is None or self.lo <= expert < self.hi

    def add(self, proj: str, tensor: torch.Tensor, expert: int | None = None) -> None:
        if expert is None:  # fused tensor: its rows lo..hi, read alone
            (self.gate_up if proj == "gate_up_proj" else self.down).copy_(tensor)
            parts = ("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)
            self.missing -= {(i, p) for i in range(self.lo, self.hi) for p in parts}
            return
        rows = {"gate_proj": slice(0, self.inter), "up_proj": slice(self.inter, 2 * self.inter)}
        local = expert - self.lo
        target = self.down[local] if proj == "down_proj" else self.gate_up[local, rows[proj]]
        target.copy_(tensor)
        self.missing.discard((expert, proj))

    def build(self, quantized: bool, dtype: torch.dtype) -> DsftExperts:
        module = DsftExperts(self.gate_up, self.down, self.act_fn, quantized, dtype)
        if self.part is not None:
            module.hold_rows(self.lo, self.num_experts)
        del self.gate_up, self.down
        return module


class StreamLoader:
    def __init__(self, path: Path, dtype: torch.dtype, quantized: bool, device: torch.device,
                 attn_implementation: str, num_layers: int | None = None,
                 expert_part: tuple[int, int] | None = None, rest_later: bool = False) -> None:
        self.path, self.dtype, self.quantized, self.device = path, dtype, quantized, device
        self.expert_part, self.rest_later = expert_part, rest_later
        self.layer_limit = num_layers
        self.attn_implementation = attn_implementation
        self.fp8_block: tuple[int, int] | None = None
        self.stages: dict[str, _ExpertStage] = {}
        self.skipped = 0

    def skeleton(self) -> nn.Module:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        quant = getattr(config, "quantization_config", None)
        if quant:
            quant = quant if isinstance(quant, dict) else quant.to_dict()
            if quant.get("quant_method") != "fp8":
                raise DsftError(f"{self.path}/config.json: quantization_config {quant.get('quant_method')!r} is not supported; use a bf16 or FP8 block-scaled checkpoint")
            self.fp8_block = tuple(quant.get("weight_block_size", (128, 128)))
            del config.quantization_config
        if self.layer_limit:  # a prefix of the layers (merge verification of big checkpoints)
            config.num_hidden_layers = min(self.layer_limit, config.num_hidden_layers)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, attn_implementation=self.attn_implementation)
        if self.quantized:
            self._linear4bit(model)
        self.num_layers = config.num_hidden_layers
        self.keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        return model

    def _linear4bit(self, model: nn.Module) -> None:
        import bitsandbytes as bnb

        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and not any(name == k or name.endswith("." + k) for k in NOT_QUANTIZED):
                parent, _, child = name.rpartition(".")
                new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                        compute_dtype=self.dtype, quant_type="nf4", compress_statistics=True,
                                        device="meta")
                # bitsandbytes' CPU inference path repacks the weight in place (eval, no grad, avx512-bf16
                # CPUs) and asserts out_features % 32 == 0, which MLA's kv_a_proj_with_mqa need not be.
                new.support_avx512bf16_for_cpu = False
                setattr(model.get_submodule(parent), child, new)

    def _tensor(self, handle: Any, key: str, keys: set[str], rows: slice | None = None) -> torch.Tensor:
        """The checkpoint's tensor, FP8 blocks dequantized; `rows`: only those rows of dim 0, read alone (a fused
        experts tensor's slice of experts) unless FP8 blocks need the whole tensor."""
        if rows is not None:
            part = handle.get_slice(key)
            if not part.get_dtype().startswith("F8"):
                return part[rows]
        tensor = self._whole(handle, key, keys)
        return tensor if rows is None else tensor[rows]

    def _whole(self, handle: Any, key: str, keys: set[str]) -> torch.Tensor:
        tensor = handle.get_tensor(key)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if key + SCALE_SUFFIX not in keys or self.fp8_block is None:
                raise DsftError(f"{self.path}: FP8 tensor {key} has no {key}{SCALE_SUFFIX} in the same shard")
            # on the target device: dequantizing 650B FP8 weights (DeepSeek-V3) on the host takes far longer
            tensor = dequantize_fp8(tensor.to(self.device), handle.get_tensor(key + SCALE_SUFFIX).to(self.device),
                                    self.fp8_block)
        return tensor

    def load(self, experts_from: nn.Module | None = None) -> nn.Module:
        """The model; `experts_from`: a loaded model whose routed-experts modules this one takes as they are (shared,
        not read again)."""
        from dsft.console import track
        from safetensors import safe_open

        model = self.skeleton()
        for name, module in (experts_from.named_modules() if experts_from is not None else ()):
            if isinstance(module, DsftExperts):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module)
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        unexpected: list[str] = []
        shards = shard_files(self.path)
        for shard in track(shards, description="loading shards", unit="shards", disable=len(shards) < 2):
            with safe_open(str(shard), framework="pt", device="cpu") as handle:
                keys = set(handle.keys())
                for key in sorted(keys):
                    if key.endswith(SCALE_SUFFIX):
                        continue
                    layer = LAYER.search(key)
                    if layer and int(layer.group(1)) >= self.num_layers:
                        self.skipped += 1
                        continue
                    read = lambda rows=None, k=key: self._tensor(handle, k, keys, rows)  # noqa: E731
                    if not self._route(model, canonical(key), read, names, (str(shard), key, handle)):
                        unexpected.append(key)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # lm_head shares the loaded embedding (a tied checkpoint stores it once)
        missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        missing += [f"{name}: experts {sorted(stage.missing)[:4]}..." for name, stage in self.stages.items()]
        if missing or unexpected:
            lines = [f"{self.path}: checkpoint is missing {len(missing)} tensors, e.g. {', '.join(missing[:5])}"] if missing else []
            lines += [f"{self.path}: checkpoint has {len(unexpected)} tensors this model does not, e.g. {', '.join(unexpected[:5])}"] if unexpected else []
            raise DsftError(*lines, "the checkpoint does not match its config.json; re-download it or fix model.path")
        for name, buf in list(model.named_buffers()):
            if buf.device != self.device:
                parent, _, child = name.rpartition(".")
                model.get_submodule(parent)._buffers[child] = buf.to(self.device)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        model.requires_grad_(False)
        return model

    def _route(self, model: nn.Module, key: str, read: Any, names: set[str], source: tuple[str, str, Any]) -> bool:
        """`key` (canonical) to its place: a layer's experts staged, anything else assigned (or, with rest_later, a
        parameter deferred: `source` is its shard file, checkpoint key and open handle)."""
        m = PER_EXPERT.match(key) or FUSED.match(key)
        if m and m.group("module") not in names:
            module_name = m.group("module")
            if isinstance(model.get_submodule(module_name), DsftExperts):  # this rank's experts are all in
                return True
            stage = self.stages.get(module_name)
            if stage is None:
                stage = self.stages[module_name] = _ExpertStage(model.get_submodule(module_name), self.device,
                                                                self.dtype, self.expert_part)
            expert = int(m.group("expert")) if "expert" in m.groupdict() else None
            if stage.wants(expert):  # another rank's expert is never read (of a fused tensor, only this rank's rows)
                tensor = read() if expert is not None else read(slice(stage.lo, stage.hi))
                stage.add(m.group("proj"), tensor.to(self.device, self.dtype), expert)
            if not stage.missing:
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, self.stages.pop(module_name).build(self.quantized, self.dtype))
            return True
        if key not in names:
            return False
        parent, _, child = key.rpartition(".")
        module = model.get_submodule(parent)
        if self.rest_later and child in module._parameters:
            from dsft.models.shards import defer

            nf4 = self.quantized and child == "weight" and type(module).__name__ == "Linear4bit"
            shape = tuple(source[2].get_slice(source[1]).get_shape())  # the header's, nothing read
            defer(module, child, shape, self.dtype, self.device, (source[0], source[1], self.fp8_block), nf4)
            return True
        self._assign(model, key, read())
        return True

    def _assign(self, model: nn.Module, key: str, tensor: torch.Tensor) -> None:
        parent, _, child = key.rpartition(".")
        module = model.get_submodule(parent)
        if child in module._buffers:
            dtype = torch.float32 if any(k in key for k in self.keep_fp32) else self.dtype
            module._buffers[child] = tensor.to(self.device, dtype if tensor.is_floating_point() else tensor.dtype)
            return
        if self.quantized and child == "weight" and type(module).__name__ == "Linear4bit":
            import bitsandbytes as bnb

            param = bnb.nn.Params4bit(tensor.to(self.dtype), requires_grad=False, quant_type="nf4",
                                      blocksize=64, compress_statistics=True, module=module)
            module.weight = param.to(self.device)
            return
        module._parameters[child] = nn.Parameter(tensor.to(self.device, self.dtype), requires_grad=False)


def load_companion(base: nn.Module, path: Path, dtype: torch.dtype, quantized: bool, device: torch.device,
                   attn_implementation: str = "sdpa") -> nn.Module:
    """A second model of `base`'s checkpoint sharing its routed-experts modules, every other parameter a placeholder
    (rest_later): what a routing profile runs under training.parallel (its rest read as the rank's FSDP2 shards)."""
    return StreamLoader(path, dtype, quantized, device, attn_implementation, rest_later=True).load(experts_from=base)


def load_streaming(path: Path, dtype: torch.dtype, quantized: bool, device: torch.device,
                   attn_implementation: str = "sdpa", num_layers: int | None = None,
                   expert_part: tuple[int, int] | None = None, rest_later: bool = False) -> nn.Module:
    """`expert_part` (index, parts): read and hold only that 1/parts of every layer's routed experts; `rest_later`:
    every other parameter a placeholder until dsft.models.shards.read_rest reads it (as the rank's shard)."""
    return StreamLoader(path, dtype, quantized, device, attn_implementation, num_layers, expert_part, rest_later).load()
