"""Per-rank memory and checkpoint bytes read under FSDP2 + expert parallelism (`training.parallel`), at 1, 2 and 4
processes: CPU over gloo, GPUs over NCCL, the same command.

Builds a DeepSeek-V3-shaped checkpoint with random weights (per-expert layout, as DeepSeek ships it), then for each
process count N runs N ranks (torchrun) that each:
  - load the NF4 model the way `dsft sft` does under `training.parallel.ep=N` (N = 1: one whole process): its own
    experts, the rest as placeholders;
  - attach LoRA r=16 on attention, shared experts and every routed expert, lay the model out with
    dsft.moe.parallel.parallelize (fsdp N x ep N) and read the rest as the rank's FSDP2 shards
    (dsft.models.shards), counting the checkpoint bytes read, expert tensors and the rest apart;
  - train a few AdamW steps on random tokens (each rank its own micro-batch).
Each rank reports the bytes it holds (expert codes and scales, expert LoRA, its AdamW state, everything else), the
bytes it read, its peak memory (host RSS on CPU; CUDA's peak allocation on GPUs) and the step time; the table shows
each against one process (a rank's share of everything held and read should be 1/N: docs/multi-gpu.md).

    python benchmarks/scale_out.py                        # 1, 2 and 4 processes, 6 layers x 32 experts
    python benchmarks/scale_out.py --procs 1,2,4,8 --experts 64 --hidden 2048 --moe-intermediate 1408
    python benchmarks/scale_out.py --smoke --procs 1      # tiny shapes, one process: checks the script (CI runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK = 16


def config(args: argparse.Namespace) -> dict:
    hidden = 64 if args.smoke else args.hidden
    return {"model_type": "deepseek_v3", "vocab_size": 1024, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "moe_intermediate_size": 32 if args.smoke else args.moe_intermediate,
            "num_hidden_layers": 3 if args.smoke else args.layers, "first_k_dense_replace": 1,
            "n_routed_experts": 8 if args.smoke else args.experts, "num_experts_per_tok": 2 if args.smoke else 4,
            "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
            "q_lora_rank": None, "kv_lora_rank": 32 if args.smoke else 128, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 16, "v_head_dim": 16, "max_position_embeddings": 4096, "routed_scaling_factor": 2.5,
            "norm_topk_prob": True, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False}


def build(path: Path, cfg: dict) -> int:
    """The checkpoint with random weights (transformers saves DeepSeek-V3's experts per expert); its bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec), dtype=torch.bfloat16)
    model.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _nbytes(tensors) -> int:  # noqa: ANN001 - parameters or optimizer state
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def _peak_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(path: Path, steps: int, batch: int, seq: int) -> dict:
    """One rank's row (the whole run when not launched by torchrun)."""
    import torch
    import torch.distributed as dist

    from dsft.adapters.lora import attach_lora
    from dsft.config.schema import AdapterSection, ModelSection
    from dsft.models import shards, stream
    from dsft.models.load import device, load_model
    from dsft.moe.experts import DsftExperts, expert_modules, layer_of
    from dsft.moe.fused import autocast_for
    from dsft.moe.lora import ExpertLoraLayer
    from dsft.moe.parallel import parallelize

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    read = {"experts": 0, "other": 0}
    loader, rows = stream.StreamLoader._tensor, shards._Rows.__call__

    def counted(key: str, tensor):  # noqa: ANN001, ANN202
        read["experts" if ".experts." in key else "other"] += tensor.nbytes
        return tensor

    stream.StreamLoader._tensor = lambda self, handle, key, *a: counted(key, loader(self, handle, key, *a))
    shards._Rows.__call__ = lambda self, lo, hi: counted(self.key, rows(self, lo, hi))
    started = time.perf_counter()
    try:
        section = ModelSection(path=str(path), dtype="bfloat16" if torch.cuda.is_available() else "float32",
                               quantization="nf4")
        base = load_model(section, path, expert_parallel=world, rest_later=True)
        every = {layer_of(n): None for n in expert_modules(base)}
        model = attach_lora(base, AdapterSection(r=RANK, alpha=2 * RANK, routed_experts="all"), every)[0]
        shards.to_meta(model)  # as dsft.train.layout lays a model out
        if world > 1:
            parallelize(model, fsdp=world, ep=world)
        shards.read_rest(model)
    finally:
        stream.StreamLoader._tensor, shards._Rows.__call__ = loader, rows
    load_s = time.perf_counter() - started
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size if hasattr(model, "config") else 1024
    generator = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(steps):
        ids = torch.randint(2, vocab, (batch, seq), generator=generator).to(device())
        tick = time.perf_counter()
        with autocast_for(model):  # a bf16 base on GPUs: the fp32 LoRA masters fed half-precision inputs, as dsft trains
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    base_experts = {id(p) for m in model.modules() if isinstance(m, DsftExperts) for p in m.parameters()}
    expert_lora = {id(p) for m in model.modules() if isinstance(m, ExpertLoraLayer)
                   for n, p in m.named_parameters() if n.startswith("lora_")}
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    row = {
        "procs": world, "rank": rank, "load_s": load_s,
        "read_expert_bytes": read["experts"], "read_other_bytes": read["other"],
        "expert_base_bytes": _nbytes(p for p in params if id(p) in base_experts),
        "expert_lora_bytes": _nbytes(p for p in params if id(p) in expert_lora),
        "other_bytes": _nbytes(p for p in params if id(p) not in base_experts | expert_lora),
        "optimizer_bytes": _nbytes(state),
        "peak_gib": _peak_gib(),
        "step_s": min(times[1:] or times), "tokens_per_s": world * batch * seq / min(times[1:] or times),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if world > 1:
        rows: list = [None] * world
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
        return {"rows": rows}
    return {"rows": [row]}


def launch(procs: int, path: Path, args: argparse.Namespace) -> list[dict]:
    """Run `measure` on `procs` ranks (torchrun; with --smoke one process runs here); the rows of every rank."""
    if procs == 1 and args.smoke:
        return measure(path, args.steps, args.batch, args.seq)["rows"]
    out = Path(tempfile.mkdtemp(prefix="dsft-scale-")) / "rows.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               __file__, "--child", str(path), str(out), "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // procs)))}
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    one = next((r for r in rows if r["procs"] == 1), None)
    mib = lambda b: f"{b / 2**20:9.2f}"  # noqa: E731
    ratio = lambda r, key: f"{r[key] / one[key]:5.2f}" if one and one[key] else "    -"  # noqa: E731
    head = (f"{'procs':>5} {'rank':>4} | {'expert NF4 MiB':>14} {'x1':>5} | {'expert LoRA':>11} {'x1':>5} | "
            f"{'AdamW':>9} {'x1':>5} | {'other MiB':>9} {'x1':>5} | {'read experts':>12} {'x1':>5} | {'read other':>10} {'x1':>5} | "
            f"{'peak GiB':>8} | {'tok/s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['procs']:>5} {r['rank']:>4} | {mib(r['expert_base_bytes']):>14} {ratio(r, 'expert_base_bytes')} | "
                     f"{mib(r['expert_lora_bytes']):>11} {ratio(r, 'expert_lora_bytes')} | "
                     f"{mib(r['optimizer_bytes'])} {ratio(r, 'optimizer_bytes')} | {mib(r['other_bytes'])} {ratio(r, 'other_bytes')} | "
                     f"{mib(r['read_expert_bytes']):>12} {ratio(r, 'read_expert_bytes')} | "
                     f"{mib(r['read_other_bytes']):>10} {ratio(r, 'read_other_bytes')} | "
                     f"{r['peak_gib']:8.2f} | {r['tokens_per_s']:7.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2,4", help="process counts, comma-separated (each divides --experts)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=32, help="routed experts per layer (V3: 256)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank per step")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the checkpoint (default: temporary)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        rows = measure(Path(args.child[0]), args.steps, args.batch, args.seq)["rows"]
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.child[1]).write_text(json.dumps(rows))
        return
    path = args.dir or Path(tempfile.mkdtemp(prefix="dsft-scale-ckpt-"))
    size = build(path, config(args)) if not (path / "config.json").is_file() else None
    rows = [row for procs in (int(p) for p in args.procs.split(",")) for row in launch(procs, path, args)]
    if size:
        print(f"checkpoint: {path} ({size / 2**20:.1f} MiB, bf16)")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
