"""MoE LoRA / QLoRA training throughput and memory on a DeepSeek-V2-Lite-shaped model (CUDA).

Builds the model with random weights and the real shapes, saves it once as a checkpoint (per-expert
layout, as DeepSeek ships it), then for each case loads it, attaches LoRA r=16 on attention, shared
experts and every routed expert, and times training steps with activation checkpointing:

  stock-bf16  transformers + PEFT (target_modules + target_parameters on the fused experts)
  stock-nf4   the same on a BitsAndBytesConfig(load_in_4bit) load (quantizes nn.Linear only)
  dsft-bf16   dsft's streaming loader, grouped-mm experts, dsft expert LoRA
  dsft-nf4    the same with every Linear and every routed expert in NF4
  *-dpo       (--dpo) DPO steps on the same model: policy and frozen "ref" adapter, sigmoid loss
  stock-dense-nf4 / dsft-dense-nf4   a dense DeepSeek LLM 7B-shaped model (Llama layout) in NF4 with LoRA on
              q/k/v/o and gate/up/down: PEFT + bitsandbytes vs dsft's loader at the same settings (ratio printed)

Every case uses TRL's fused LM head (per-token log-probs in tiles, no full logits), so the cases differ
only in how the model and its adapters are held and run. Prints one table; --json writes the rows.

    python benchmarks/moe_sft.py                       # all cases, 2x2048 and 8x2048
    python benchmarks/moe_sft.py --cases dsft-nf4 --batches 8 --layers 8
    python benchmarks/moe_sft.py --smoke --batches 2 --seq 64   # tiny shapes: checks the script (CPU too)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import torch

V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, first_k_dense_replace=1,
    n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, kv_lora_rank=512, q_lora_rank=None,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", routed_scaling_factor=1.0,
    max_position_embeddings=8192, tie_word_embeddings=False,
)
SMOKE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, topk_method="greedy", routed_scaling_factor=1.0,
    max_position_embeddings=256, tie_word_embeddings=False,
)
DENSE_7B = dict(  # DeepSeek LLM 7B: Llama layout, multi-head attention
    vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
)
DENSE_SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                   tie_word_embeddings=False)
DENSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
H100_BF16_PEAK = 989.4e12  # dense bf16 tensor-core peak of an H100 SXM (the H200's is the same)
GIB = 2**30
# Where cases run: CUDA in bf16; `--smoke` without a GPU runs on CPU in fp32 (bf16 matmuls are ~100x slower there).
DEVICE = torch.device("cuda", 0)
DTYPE = torch.bfloat16


def _cuda() -> bool:
    return DEVICE.type == "cuda"


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _gib(stat) -> float | None:
    """A CUDA memory statistic in GiB; None on CPU, which has no allocator statistics."""
    return stat() / GIB if _cuda() else None


def active_flops_per_token(cfg: dict, seq: int) -> float:
    """Model FLOPs of one LoRA training token: forward (2N) + input-gradient backward (2N) over the
    active matmul weights, plus attention scores; recomputation not counted. LoRA terms are ignored."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk, v = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    attn = h * heads * qk + h * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) \
        + cfg["kv_lora_rank"] * heads * (cfg["qk_nope_head_dim"] + v) + heads * v * h
    expert = 3 * h * cfg["moe_intermediate_size"]
    moe = expert * (cfg["num_experts_per_tok"] + cfg["n_shared_experts"]) + h * cfg["n_routed_experts"]
    dense, layers, first = 3 * h * cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    n = layers * attn + first * dense + (layers - first) * moe + h * cfg["vocab_size"]
    scores = layers * heads * seq * (qk + v)  # causal: half of the full seq x seq products, times 2 FLOPs
    return 4 * n + 4 * scores


def build_checkpoint(cfg: dict, path: Path, model_type: str = "deepseek_v2") -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.perf_counter()
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE)
    model.save_pretrained(path, max_shard_size="4GB")
    del model
    _free()
    return time.perf_counter() - start


def _free() -> None:
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()
    _reset_peak()


def _reset_peak() -> None:
    if _cuda():
        torch.cuda.reset_peak_memory_stats()


def _rss_gib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


class HostPeak:
    """Peak resident host memory above the starting level, sampled every 20 ms while in the block."""

    def __enter__(self) -> "HostPeak":
        self.base = self.peak = _rss_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_gib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_gib())

    @property
    def gib(self) -> float:
        return self.peak - self.base


def _moe_layers(cfg: dict) -> list[int]:
    return list(range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]))


def load_case(case: str, path: Path, cfg: dict):
    from trl.trainer.utils import add_fused_lm_head

    if case.startswith("stock"):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=DTYPE) if case.endswith("nf4") else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE, device_map={"": DEVICE},
                                                     quantization_config=quant)
        add_fused_lm_head(model)
        if "dense" in case:
            return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=DENSE_TARGETS))
        config = LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION + ["shared_experts.gate_proj",
                            "shared_experts.up_proj", "shared_experts.down_proj"],
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        return get_peft_model(model, config)

    from dsft.adapters.lora import attach_lora
    from dsft.config.schema import AdapterSection
    from dsft.models.stream import load_streaming

    model = load_streaming(path, DTYPE, case.endswith("nf4"), DEVICE)
    add_fused_lm_head(model)
    if "dense" in case:  # the same modules as the stock case: attention and the MLP of every layer
        return attach_lora(model, AdapterSection(r=16, alpha=32), {})[0]
    adapter = AdapterSection(r=16, alpha=32, dense_mlp=False, routed_experts="all")
    return attach_lora(model, adapter, dict.fromkeys(_moe_layers(cfg)))[0]


def _optimizer(model) -> torch.optim.Optimizer:
    """Fused AdamW, the Trainer's default (`optim: adamw_torch_fused`), so the step costs what `dsft sft` pays."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)


def _autocast():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=_cuda())  # as the Trainer runs with bf16=True


def train_steps(model, batch: int, seq: int, steps: int, warmup: int, vocab: int) -> tuple[float, float | None, float]:
    """(tokens/s, peak GiB, last loss) over `steps` timed optimizer steps after `warmup` ones; the loss
    is the last step's, computed before its update."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    optimizer = _optimizer(model)
    _reset_peak()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    loss = torch.zeros(())
    start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            _sync()
            start = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, seq), device=DEVICE, generator=gen)
        with _autocast():
            out = model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False)
        loss = -out.log_probs.sum() / out.label_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    elapsed = time.perf_counter() - start
    return batch * seq * steps / elapsed, _gib(torch.cuda.max_memory_allocated), float(loss.detach())


def add_reference(model) -> None:
    """TRL's DPO reference for a PEFT policy: a frozen "ref" copy of the adapter."""
    model.add_adapter("ref", model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
    model.set_adapter("default")


def _sequence_logps(model, ids: torch.Tensor) -> torch.Tensor:
    with _autocast():
        out = model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False)
    return out.log_probs.sum(-1)


def dpo_steps(model, pairs: int, seq: int, steps: int, warmup: int, vocab: int,
              beta: float = 0.1) -> tuple[float, float | None, float]:
    """(tokens/s, peak GiB, pairs/s) for DPO steps: policy on chosen+rejected, reference under the
    frozen "ref" adapter without gradients, sigmoid loss; tokens count both sequences of a pair."""
    from trl.trainer.utils import use_adapter

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    if "ref" not in model.peft_config:
        add_reference(model)
    optimizer = _optimizer(model)
    _reset_peak()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            _sync()
            start = time.perf_counter()
        ids = torch.randint(0, vocab, (2 * pairs, seq), device=DEVICE, generator=gen)
        with torch.no_grad(), use_adapter(model, adapter_name="ref"):
            ref = _sequence_logps(model, ids)
        policy = _sequence_logps(model, ids)
        ratio = (policy - ref)
        loss = -torch.nn.functional.logsigmoid(beta * (ratio[:pairs] - ratio[pairs:])).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    elapsed = time.perf_counter() - start
    return 2 * pairs * seq * steps / elapsed, _gib(torch.cuda.max_memory_allocated), pairs * steps / elapsed


def run(args: argparse.Namespace) -> list[dict]:
    shapes = SMOKE if args.smoke else V2_LITE
    cfg = dict(shapes, num_hidden_layers=args.layers or shapes["num_hidden_layers"])
    dense_shapes = DENSE_SMOKE if args.smoke else DENSE_7B
    dense_cfg = dict(dense_shapes, num_hidden_layers=args.layers or dense_shapes["num_hidden_layers"])
    cases = args.cases.split(",")
    paths = {"moe": Path(args.checkpoint), "dense": Path(args.checkpoint + "-dense")}
    rows: list[dict] = []
    for family, family_cfg, model_type in (("moe", cfg, "deepseek_v2"), ("dense", dense_cfg, "llama")):
        wanted = any(("dense" in c) == (family == "dense") for c in cases)
        if wanted and not (paths[family] / "config.json").is_file():
            print(f"building random checkpoint at {paths[family]} ...", flush=True)
            print(f"  saved in {build_checkpoint(family_cfg, paths[family], model_type):.1f}s", flush=True)
    if args.build_only:
        return rows
    for case in cases:
        dense = "dense" in case
        path, cfg_case = (paths["dense"], dense_cfg) if dense else (paths["moe"], cfg)
        _free()
        row: dict = {"case": case}
        try:
            start = time.perf_counter()
            with HostPeak() as host:
                model = load_case(case, path, cfg_case)
                _sync()
            row.update(load_s=time.perf_counter() - start, load_peak_gib=_gib(torch.cuda.max_memory_allocated),
                       resident_gib=_gib(torch.cuda.memory_allocated), host_load_gib=host.gib)
        except torch.cuda.OutOfMemoryError:
            rows.append({**row, "note": "OOM while loading"})
            print(rows[-1], flush=True)
            continue
        for batch in (int(b) for b in args.batches.split(",")):
            _free()
            entry = dict(row, batch=f"{batch}x{args.seq}")
            try:
                tps, peak, loss = train_steps(model, batch, args.seq, args.steps, args.warmup, cfg_case["vocab_size"])
                entry.update(tokens_per_s=tps, peak_gib=peak, loss=loss)
                if _cuda() and not dense:
                    entry["mfu"] = tps * active_flops_per_token(cfg, args.seq) / H100_BF16_PEAK
            except torch.cuda.OutOfMemoryError:
                entry["note"] = "OOM in training"
            rows.append(entry)
            print(json.dumps(entry), flush=True)
        if args.dpo and case.startswith("dsft") and not dense:
            for batch in (int(b) for b in args.batches.split(",")):
                _free()
                entry = dict(row, case=case + "-dpo", batch=f"{batch // 2}x2x{args.seq}")
                try:
                    tps, peak, pps = dpo_steps(model, batch // 2, args.seq, args.steps, args.warmup, cfg["vocab_size"])
                    entry.update(tokens_per_s=tps, peak_gib=peak, note=f"{pps:.2f} pairs/s")
                except torch.cuda.OutOfMemoryError:
                    entry["note"] = "OOM in DPO"
                rows.append(entry)
                print(json.dumps(entry), flush=True)
        del model
    if args.remove_checkpoint:
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
    return rows


def ratios(rows: list[dict]) -> list[str]:
    """dsft's tokens/s over stock's, per case pair and batch, from the same run."""
    speed = {(r["case"], r.get("batch")): r["tokens_per_s"] for r in rows if r.get("tokens_per_s")}
    out = []
    for (case, batch), tps in sorted(speed.items()):
        stock = speed.get((case.replace("dsft-", "stock-", 1), batch)) if case.startswith("dsft-") else None
        if stock:
            out.append(f"{case} / {case.replace('dsft-', 'stock-', 1)} at {batch}: {tps / stock:.2f}x tokens/s")
    return out


def table(rows: list[dict]) -> str:
    head = (f"{'case':<13} {'batch':<8} {'tokens/s':>9} {'peak GiB':>9} {'MFU':>6} {'load s':>7} {'load peak':>9} "
            f"{'resident':>9} {'host load':>9}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        fmt = lambda k, f: format(r[k], f) if r.get(k) is not None else "-"  # noqa: E731
        lines.append(f"{r['case']:<13} {r.get('batch', '-'):<8} {fmt('tokens_per_s', ',.0f'):>9} {fmt('peak_gib', '.1f'):>9} "
                     f"{fmt('mfu', '.1%'):>6} {fmt('load_s', '.1f'):>7} {fmt('load_peak_gib', '.1f'):>9} "
                     f"{fmt('resident_gib', '.1f'):>9} {fmt('host_load_gib', '.1f'):>9}  {r.get('note', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="stock-bf16,stock-nf4,dsft-bf16,dsft-nf4")
    parser.add_argument("--batches", default="2,8", help="micro-batch sizes (sequences of --seq tokens)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--checkpoint", default=None, help="where the random checkpoint is built and read "
                        "(default /tmp/dsft-bench-v2lite, or /tmp/dsft-bench-smoke with --smoke)")
    parser.add_argument("--remove-checkpoint", action="store_true")
    parser.add_argument("--dpo", action="store_true", help="also time DPO steps (dsft cases) at the same tokens per "
                        "step: batch B means B/2 pairs of chosen+rejected")
    parser.add_argument("--build-only", action="store_true", help="only write the random checkpoint (run the cases "
                        "in a second process to measure their host memory alone)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny DeepSeek-V2 shapes instead of V2-Lite's, on CPU "
                        "(fp32) when there is no GPU: checks that the script runs, measures nothing worth quoting")
    args = parser.parse_args(argv)
    global DEVICE, DTYPE
    if not torch.cuda.is_available():
        if not args.smoke:
            raise SystemExit("benchmarks/moe_sft.py needs a CUDA GPU (--smoke runs tiny shapes on CPU)")
        DEVICE, DTYPE = torch.device("cpu"), torch.float32
    args.checkpoint = args.checkpoint or ("/tmp/dsft-bench-smoke" if args.smoke else "/tmp/dsft-bench-v2lite")
    rows = run(args)
    if args.build_only:
        return
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    where = torch.cuda.get_device_name() if _cuda() else "CPU (fp32)"
    print(f"\n{where}, torch {torch.__version__}, process peak RSS {peak_rss:.1f} GiB; "
          "GiB columns are GPU memory except 'host load' (host RSS growth while loading)")
    print(table(rows))
    for line in ratios(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
