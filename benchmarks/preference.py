"""Step time of the preference objectives on the same pairs and model, in one process: DPO (a reference
forward pass per step: the frozen "ref" adapter, or the base with the adapter off), ORPO and SimPO (no
reference model), KTO (a reference pass over its completions and their KL mismatches).

Each objective trains `--steps` steps (default 23) through dsft's own spine (the same recipe but its
section: same pairs, model, adapter, micro-batch and lr); a callback times every optimizer step
(wall clock between on_step_begin and on_step_end), and the median of the steps after `--warmup` (3) is
reported with its ratio to DPO's, measured in the same run. CPU by default on the built-in tiny MoE;
`--model PATH` times a checkpoint of your own (on a GPU machine).

    python benchmarks/preference.py
    python benchmarks/preference.py --smoke       # 5 steps each: checks the script (CI runs it)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
OBJECTIVES = ("dpo", "orpo", "simpo", "kto")


def recipe(work: Path, name: str, model: str, steps: int, micro_batch: int) -> Path:
    section = {"max_prompt_length": 96}
    data = {"model": {"path": model, "dtype": "float32" if model.startswith("builtin:") else "auto"},
            "data": {"train": str(REPO / "data_templates/legal/preference.jsonl"), "format": "preference",
                     "max_length": 192},
            name: section,
            "adapter": {"r": 8, "alpha": 16, "routed_experts": {1: [0, 3], 2: [5]}} if model.startswith("builtin:") else {},
            "training": {"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0, "max_steps": steps,
                         "micro_batch_size": micro_batch, "logging_steps": 1000, "save_steps": 10_000},
            "output_dir": str(work / name)}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def time_objective(name: str, path: Path) -> list[float]:
    """Seconds of each optimizer step of one run of objective `name`."""
    from transformers import TrainerCallback

    from dsft.config import load_recipe
    from dsft.train import pipeline, resume
    from dsft.train.objective import objective

    durations: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            durations.append(time.perf_counter() - self.start)

    original = resume.train

    def timed(trainer, run, command, checkpoint, metadata=None):  # noqa: ANN001, ANN202
        trainer.add_callback(Timer())
        return original(trainer, run, command, checkpoint, metadata)

    resume.train = timed
    try:
        goal = objective(name)
        loaded = load_recipe(path, check_files=True)
        pipeline.run(pipeline.preflight(loaded, goal, force=True), goal, force=True)
    finally:
        resume.train = original
    return durations


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:tiny-deepseek-v3")
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--smoke", action="store_true", help="5 steps each, 1 warm-up")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 5, 1
    import torch

    from dsft.cli._common import offline

    offline()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsft-pref-bench-") as tmp:
        for name in args.objectives.split(","):
            steps = time_objective(name, recipe(Path(tmp), name, args.model, args.steps, args.micro_batch))
            timed = steps[args.warmup:]
            rows.append({"objective": name, "steps": len(timed), "median_s": statistics.median(timed),
                         "reference_forward": name in ("dpo", "kto")})
            print(f"  {name}: median {rows[-1]['median_s'] * 1000:.1f} ms over {len(timed)} steps", file=sys.stderr)
    dpo = next((r["median_s"] for r in rows if r["objective"] == "dpo"), None)
    print(f"{args.model}, micro-batch {args.micro_batch} pairs, median of {args.steps - args.warmup} steps after "
          f"{args.warmup} warm-up, {'CUDA' if torch.cuda.is_available() else 'CPU'}")
    print(f"{'objective':<10} {'step ms':>9} {'x dpo':>7}  reference forward")
    for r in rows:
        ratio = f"{r['median_s'] / dpo:.2f}" if dpo else "-"
        print(f"{r['objective']:<10} {r['median_s'] * 1000:>9.1f} {ratio:>7}  {'yes' if r['reference_forward'] else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
