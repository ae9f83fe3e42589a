"""Profile training steps of one benchmark case and print the CUDA kernels that take the time.

    python benchmarks/profile_step.py --case dsft-bf16 --batch 8 --layers 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from moe_sft import V2_LITE, build_checkpoint, load_case, train_steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="dsft-bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--checkpoint", default="/tmp/dsft-profile")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    cfg = dict(V2_LITE, num_hidden_layers=args.layers)
    path = Path(args.checkpoint)
    if not (path / "config.json").is_file():
        build_checkpoint(cfg, path)
    for case in args.case.split(","):
        model = load_case(case, path, cfg)
        tps, peak, _ = train_steps(model, args.batch, args.seq, 3, 2, cfg["vocab_size"])
        print(f"{case}: {tps:,.0f} tokens/s, peak {peak:.1f} GiB ({args.layers} layers)")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            train_steps(model, args.batch, args.seq, 1, 0, cfg["vocab_size"])
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
