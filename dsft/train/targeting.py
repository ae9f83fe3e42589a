"""Expert targeting for a run: profile the training data's routing (cached in RUN/routing), apply the
recipe's policy, and write the plan. Shared by `dsft sft` and `dsft experts`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from dsft.adapters.plan import build_plan
from dsft.adapters.selection import select_by_policy
from dsft.config.schema import Recipe
from dsft.moe import profile as routing_profile
from dsft.models.load import world_size
from dsft.outputs import is_main, write_atomic
from dsft.runs import run_dir

ROUTING_DIR = run_dir.ROUTING


def profile_key(recipe: Recipe, identity: dict[str, Any], data_sha: dict[str, str], samples: int, count: str) -> str:
    return routing_profile.profile_key({
        "model": identity["config_sha256"], "data": sorted(data_sha.values()), "samples": samples, "count": count,
        "seed": recipe.training.seed, "max_length": recipe.data.max_length, "template": recipe.data.chat_template,
        "format": recipe.data.format, "version": routing_profile.VERSION,
    })


def ensure_profile(model: nn.Module, recipe: Recipe, tokens: Any, pad_id: int, key: str,
                   directory: Path, samples: int, count: str, reprofile: bool = False,
                   runner: Any = None) -> tuple[dict[str, Any], bool]:
    """The cached profile when its key matches, else a new one written to `directory`, its forwards run by `model`
    or, with `runner`, by the model the context manager it returns gives (a companion holding its shard of the
    weights `model` still holds as placeholders, training.parallel). Returns (profile, computed). On several
    processes each profiles its share of the sampled rows and their counts are summed (every rank then holds the
    same profile, so the same experts are chosen on every rank)."""
    if not reprofile:
        cached = routing_profile.read_profile(directory, key)
        if _everywhere(cached is not None, model):
            return cached, False
    import contextlib

    with runner() if runner is not None else contextlib.nullcontext(model) as forwards:
        profile = _computed(forwards, recipe, tokens, pad_id, key, directory, samples, count)
        del forwards  # the runner's model (a companion) is freed when the block ends, not when this function returns
    return profile, True


def _computed(model: nn.Module, recipe: Recipe, tokens: Any, pad_id: int, key: str, directory: Path, samples: int,
              count: str) -> dict[str, Any]:
    """A new profile of `tokens` (each rank its share of the sampled rows, counts summed), written to `directory`."""
    import time

    started = time.monotonic()
    sample = tokens.sample(samples, recipe.training.seed, recipe.data.max_length)  # dsft.data.prepared.Tokens
    stats = collect_shared(model, sample, count, recipe.training.micro_batch_size, pad_id)
    from dsft.moe.routing import top_k

    counted = next(iter(stats.values())).tokens
    meta = {"key": key, "rows": len(sample["input_ids"]), "tokens_counted": counted, "count": count,
            "unique_rows": len(tokens.distinct()), "seconds": round(time.monotonic() - started, 2)}
    profile = routing_profile.summarize(stats, top_k(model), meta)
    if is_main():
        routing_profile.write_profile(directory, profile)
    return profile


def collect_shared(model: nn.Module, sample: dict[str, list[list[int]]], count: str, batch: int,
                   pad_id: int) -> dict[int, Any]:
    """Routing stats of `sample`'s rows (dsft.moe.profile.collect): on several processes each runs its share of the
    rows, every rank as many forwards (expert parallelism exchanges tokens in each), and the counts are summed."""
    rank, world = _rank_of(), world_size()
    share = {column: rows[rank::world] for column, rows in sample.items()}
    most = -(-len(sample["input_ids"]) // world)  # the largest share: every rank runs its number of batches
    stats = routing_profile.collect(model, share, all_tokens=count == "all", batch_size=batch, pad_id=pad_id,
                                    forwards=-(-most // batch), progress=is_main())
    _sum_over_ranks(stats, model)
    return stats


def _rank_of() -> int:
    import torch.distributed as dist

    return dist.get_rank() if world_size() > 1 else 0


def _everywhere(flag: bool, model: nn.Module) -> bool:
    """`flag` on every rank (a cached profile found by all of them, or each computes its share)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    found = torch.tensor([int(flag)], device=next(model.parameters()).device)
    dist.all_reduce(found, op=dist.ReduceOp.MIN)
    return bool(found.item())


def _sum_over_ranks(stats: dict[int, Any], model: nn.Module) -> None:
    """Each layer's routing counts, gate sums and tokens summed over the ranks' shares (in place)."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    layers = sorted(stats)
    flat = torch.cat([torch.cat([stats[layer].counts, stats[layer].gate_sum,
                                 torch.tensor([float(stats[layer].tokens)], dtype=torch.float64)]) for layer in layers])
    flat = flat.to(next(model.parameters()).device)
    dist.all_reduce(flat)
    flat = flat.cpu()
    offset = 0
    for layer in layers:
        e = stats[layer].num_experts
        stats[layer].counts, stats[layer].gate_sum = flat[offset:offset + e], flat[offset + e:offset + 2 * e]
        stats[layer].tokens = int(flat[offset + 2 * e])
        offset += 2 * e + 1


def policy_selection(recipe: Recipe, profile: dict[str, Any], directory: Path | None = None) -> dict[int, list[int]]:
    """The policy's experts; with `directory` (the profile's), its heatmap is redrawn with them boxed."""
    selection = select_by_policy(recipe.adapter.routed_experts, profile)
    if directory is not None and is_main():
        routing_profile.heatmap(profile, directory / "heatmap.png", "routing profile", selected=selection)
    return selection


def write_plan(run: Path, recipe: Recipe, cfg: dict[str, Any], selection: dict[int, list[int] | None],
               data: dict[str, Any] | None = None, profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan (with `data`: where the prepared rows are, data_summary; `profile`: the routing profile's rows
    and time, profile_summary), written to RUN/plan.json."""
    plan = build_plan(recipe, cfg, selection, world_size())
    if data:
        plan["data"] = data
    if profile:
        plan["profile"] = profile
    if is_main():
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(run / run_dir.PLAN, json.dumps(plan, indent=2) + "\n")
    return plan


def profile_summary(profile: dict[str, Any], computed: bool) -> dict[str, Any]:
    """What the plan says of a routing profile: rows sampled (distinct rows of data.train), tokens, seconds."""
    return {"rows": profile.get("rows", 0), "unique_rows": profile.get("unique_rows", profile.get("rows", 0)),
            "tokens_counted": profile.get("tokens_counted", 0), "seconds": profile.get("seconds", 0.0),
            "cached": not computed}


def data_summary(train: Any, eval_: Any = None) -> dict[str, Any]:
    """Rows, tokens and cache entries of the prepared splits (dsft.data.prepared.Tokens; a mix: each file's
    entry and its share), for the plan."""
    out = {}
    for what, t in (("data.train", train), ("data.eval", eval_)):
        if t is None:
            continue
        parts = getattr(t, "parts", None)
        out[what] = {"rows": len(t), "tokens": t.tokens,
                     "cache": [str(p.path) for p in parts] if parts else str(t.path),
                     **({"mix": t.meta["mix"]} if t.meta.get("mix") else {})}
    return out


def check_plan(plan: dict[str, Any], actual: dict[str, int]) -> None:
    """The plan is computed from config.json; the adapter from the live model. They must agree."""
    planned = {g: v["params"] for g, v in plan["groups"].items()}
    if planned != {g: n for g, n in actual.items() if n}:
        raise RuntimeError(f"targeting plan {planned} does not match the adapter {actual}")
