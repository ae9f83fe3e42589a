"""`dsft merge` throughput and memory on DeepSeek-V3-shaped checkpoints (CPU; no GPU needed).

Builds two checkpoints with random weights laid out as DeepSeek-V3 releases them (per-expert keys,
sharded with an index): one in bf16, one in FP8 e4m3 with 128x128 `weight_scale_inv` blocks (partial edge
tiles: V3's 576-row kv_a_proj_with_mqa). An adapter with LoRA r=16 on every attention projection and on
4 routed experts per layer is written beside them. Then, for each base, after one warm read of its
shards:

  copy         shutil.copyfile of every shard (the disk's speed: the bound for a merge)
  merge        dsft's streaming merge into bf16 (FP8 bases: dequantized on the way)
  merge-fp8    (FP8 base) --dtype fp8: untouched units copied as FP8, touched ones written in bf16

Each merge runs in a child process, whose peak RSS is reported. Prints one table (MB/s of base
bytes, ratio to copy, peak RSS); --json writes the rows. Targets, reported and not asserted: bf16 base
>= 0.5x copy speed, FP8 -> bf16 >= 0.25x, RSS < 2 GB.

    python benchmarks/merge.py                  # ~2.6 GB FP8 / 5.2 GB bf16 (2 layers x 24 experts of V3)
    python benchmarks/merge.py --experts 8      # smaller
    python benchmarks/merge.py --smoke          # tiny shapes, < 20 s: checks the script (CI runs it)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

V3 = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_attention_heads=128,
          num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
          v_head_dim=128, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4)
SMOKE = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=4, q_lora_rank=192, kv_lora_rank=192, qk_nope_head_dim=32, qk_rope_head_dim=16,
             v_head_dim=32, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1)
BLOCK = 128
RANK = 16
MB = 1e6


def config(layers: int, experts: int, smoke: bool) -> dict:
    return {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], **(SMOKE if smoke else V3),
            "num_hidden_layers": layers, "n_routed_experts": experts, "first_k_dense_replace": 0, "moe_layer_freq": 1,
            "vocab_size": 1024, "max_position_embeddings": 4096, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 0, "eos_token_id": 1}


def shapes(cfg: dict) -> dict[str, list[int]]:
    """Every tensor name and shape as the release stores it (transformers' names, per-expert experts)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16)
    out: dict[str, list[int]] = {}
    for name, t in model.state_dict().items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            prefix = name.rsplit(".", 1)[0]
            e, a, b = t.shape
            for i in range(e):
                if name.endswith("gate_up_proj"):
                    out[f"{prefix}.{i}.gate_proj.weight"] = out[f"{prefix}.{i}.up_proj.weight"] = [a // 2, b]
                else:
                    out[f"{prefix}.{i}.down_proj.weight"] = [a, b]
        else:
            out[name] = list(t.shape)
    return out


def build(dst: Path, cfg: dict, fp8: bool, shard_bytes: int) -> int:
    """Write the checkpoint shard by shard; returns its weight bytes."""
    import torch
    from safetensors.torch import save_file

    from dsft.models.fp8 import quantize

    dst.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    weight_map, size, total = {}, 0, 0

    def flush() -> None:
        nonlocal size
        if shards[-1]:
            shards.append({})
            size = 0

    names = shapes(cfg)
    for i, (name, shape) in enumerate(names.items()):
        t = torch.randn(shape, generator=gen) * 0.02 if len(shape) == 2 else torch.ones(shape)
        if fp8 and len(shape) == 2 and name.endswith("proj.weight") or fp8 and name.endswith("proj_with_mqa.weight"):
            q, scale = quantize(t, (BLOCK, BLOCK))
            tensors = {name: q, name + "_scale_inv": scale}
        else:
            tensors = {name: t.to(torch.bfloat16) if len(shape) == 2 or "norm" in name else t}
        for k, v in tensors.items():
            shards[-1][k] = v.contiguous()
            n = v.numel() * v.element_size()
            size, total = size + n, total + n
        if size >= shard_bytes:
            flush()
    if not shards[-1]:
        shards.pop()
    count = len(shards)
    for j, tensors in enumerate(shards):
        file = f"model-{j + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    full = dict(cfg)
    if fp8:
        full["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [BLOCK, BLOCK]}
    (dst / "config.json").write_text(json.dumps(full, indent=2))
    return total


def adapter(dst: Path, cfg: dict, per_layer: int = 4) -> None:
    """dsft adapter files: LoRA on the attention projections of every layer and on `per_layer` experts."""
    import torch
    from safetensors.torch import save_file

    from dsft.arch import IDENTITY, attention_shapes

    dst.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    r, h, inter = RANK, cfg["hidden_size"], cfg["moe_intermediate_size"]
    weights, modules = {}, []
    for layer in range(cfg["num_hidden_layers"]):
        for proj, (fan_in, fan_out) in attention_shapes(cfg).items():
            module = f"model.layers.{layer}.self_attn.{proj}"
            modules.append(module)
            weights[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * 0.01
            weights[f"base_model.model.{module}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.01
        p = f"base_model.model.model.layers.{layer}.mlp.experts"
        n = per_layer
        weights |= {f"{p}.lora_gate_up_A.weight": torch.randn(n, r, h, generator=gen) * 0.01,
                    f"{p}.lora_gate_up_B.weight": torch.randn(n, 2 * inter, r, generator=gen) * 0.01,
                    f"{p}.lora_down_A.weight": torch.randn(n, r, inter, generator=gen) * 0.01,
                    f"{p}.lora_down_B.weight": torch.randn(n, h, r, generator=gen) * 0.01}
    save_file(weights, dst / "adapter_model.safetensors")
    (dst / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                         "target_modules": modules, "bias": "none"}))
    experts = {str(layer): list(range(per_layer)) for layer in range(cfg["num_hidden_layers"])}
    (dst / "dsft_adapter.json").write_text(json.dumps({
        "format": "dsft-adapter", "version": 1, "base_model": {k: cfg.get(k) for k in IDENTITY},
        "groups": {"attention": {"r": r, "alpha": 2 * r, "modules": modules}},
        "routed_experts": {"r": r, "alpha": 2 * r, "mode": "lora", "experts": experts}}))


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


def warm(path: Path) -> None:
    for shard in _shards(path):
        with shard.open("rb") as f:
            while f.read(1 << 24):
                pass


def copy_speed(base: Path, scratch: Path) -> float:
    warm(base)
    scratch.mkdir()
    start = time.perf_counter()
    for shard in _shards(base):
        shutil.copyfile(shard, scratch / shard.name)
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return seconds


def measure(base: str, adapter_dir: str, out: str, dtype: str) -> dict:
    """Merge, and the seconds it took and this process's peak RSS."""
    from dsft.export.merge import Source, merge

    start = time.perf_counter()
    record = merge(Source(Path(adapter_dir), Path(base), None, None), Path(out), dtype=dtype, progress=False)
    seconds = time.perf_counter() - start
    # VmHWM, not getrusage: ru_maxrss survives execve and would report the parent's memory at fork
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    rss = int(hwm.split()[1]) * 1024
    return {"seconds": seconds, "rss": rss, "touched": record["touched_tensors"], "retention": record["retention"]}


def child(base: str, adapter_dir: str, out: str, dtype: str) -> None:
    """In a fresh process (its peak RSS the merge's own): measure, printed as JSON."""
    print(json.dumps(measure(base, adapter_dir, out, dtype)))


def merge_speed(base: Path, adapter_dir: Path, out: Path, dtype: str, inline: bool = False) -> dict:
    """One merge timed in a child process (`inline`: in this one, for --smoke, which checks the script only)."""
    warm(base)
    if inline:
        result = measure(str(base), str(adapter_dir), str(out), dtype)
        shutil.rmtree(out)
        return result
    done = subprocess.run([sys.executable, __file__, "--child", str(base), str(adapter_dir), str(out), dtype],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
    shutil.rmtree(out)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=24, help="routed experts per layer (V3 has 256)")
    parser.add_argument("--shard-mb", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (~20 MB): checks the script")
    parser.add_argument("--dir", type=Path, default=None, help="where to build (default: a temporary directory)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    cfg = config(args.layers, 8 if args.smoke else args.experts, args.smoke)
    root = args.dir or Path(tempfile.mkdtemp(prefix="dsft-merge-bench-"))
    shard_bytes = (4 if args.smoke else args.shard_mb) * 2**20
    rows = []
    try:
        adapter(root / "adapter", cfg)
        for kind in ("bf16", "fp8"):
            base = root / kind
            size = build(base, cfg, kind == "fp8", shard_bytes)
            copy_s = copy_speed(base, root / "copy")
            rows.append({"base": kind, "case": "copy", "mb": size / MB, "seconds": copy_s, "ratio": 1.0, "rss": None})
            for dtype in ("bf16", "fp8") if kind == "fp8" else ("bf16",):
                run = merge_speed(base, root / "adapter", root / "out", dtype, inline=args.smoke)
                rows.append({"base": kind, "case": "merge" if dtype == "bf16" else "merge-fp8", "mb": size / MB,
                             "seconds": run["seconds"], "ratio": copy_s / run["seconds"], "rss": run["rss"],
                             "retention": run["retention"]})
            shutil.rmtree(base)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'base':<6}{'case':<11}{'size MB':>9}{'s':>8}{'MB/s':>9}{'x copy':>8}{'peak RSS MB':>13}{'retention':>11}")
    for r in rows:
        rss = f"{r['rss'] / MB:.0f}" if r["rss"] else "-"
        kept = f"{r['retention']:.4f}" if r.get("retention") is not None else "-"
        print(f"{r['base']:<6}{r['case']:<11}{r['mb']:>9.0f}{r['seconds']:>8.2f}{r['mb'] / r['seconds']:>9.0f}"
              f"{r['ratio']:>8.2f}{rss:>13}{kept:>11}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
