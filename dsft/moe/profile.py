"""Routing profile: where a task's tokens go, per layer and expert.

`profile.json` is the source of truth; `profile.csv` and `heatmap.png` are views of it. For each MoE
layer: tokens counted, per expert the top-k hits (`counts`), the share of tokens that select it
(`token_share`, summing to top_k over a layer), and the mean and summed gate value (`gate_mean`,
`gate_sum`, see dsft.moe.routing), plus the entropy of the layer's load against a uniform load.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsft.data.tokenize import IGNORE
from dsft.outputs import write_atomic
from dsft.moe.routing import LayerStats, RoutingRecorder

VERSION = 2  # 2: a mix's repeated rows are profiled once


def batches(tokens: dict[str, list[list[int]]], batch_size: int, pad_id: int):
    ids, labels = tokens["input_ids"], tokens["labels"]
    for start in range(0, len(ids), batch_size):
        chunk = range(start, min(start + batch_size, len(ids)))
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        label = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(ids[i])
            input_ids[row, :n] = torch.tensor(ids[i])
            attention[row, :n] = 1
            label[row, :n] = torch.tensor(labels[i])
        yield input_ids, attention, label


@torch.no_grad()
def collect(model: nn.Module, tokens: dict[str, list[list[int]]], *, all_tokens: bool = False, batch_size: int = 8,
            pad_id: int = 0, progress: bool = True, forwards: int = 0) -> dict[int, LayerStats]:
    """Run `model` over tokenized rows and return each MoE layer's routing stats. Padding never counts;
    by default only the tokens the loss is on (labels != -100) do, with `all_tokens` every real token. At least
    `forwards` forward passes are run (those past the rows on one pad token that counts nothing), so that ranks
    whose experts exchange tokens in every forward run as many."""
    from dsft.console import track

    recorder = RoutingRecorder(model)
    if not recorder.routers:
        from dsft.errors import DsftError

        raise DsftError("model.path: this model has no routed experts to profile")
    from dsft.moe.fused import autocast_for

    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    steps = math.ceil(len(tokens["input_ids"]) / batch_size)
    with recorder.installed(), autocast_for(model):
        for input_ids, attention, label in track(batches(tokens, batch_size, pad_id), total=steps,
                                                 description="profiling routing", unit="batches", disable=not progress):
            recorder.mask = attention.bool() if all_tokens else (attention.bool() & (label != IGNORE))
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
        for _ in range(forwards - steps):
            recorder.mask = torch.zeros(1, 1, dtype=torch.bool)
            model(input_ids=torch.full((1, 1), pad_id, device=device), use_cache=False)
    model.train(was_training)
    return recorder.stats


def summarize(stats: dict[int, LayerStats], top_k: int, meta: dict[str, Any]) -> dict[str, Any]:
    layers = {}
    for layer, s in stats.items():
        tokens = max(s.tokens, 1)
        load = s.counts / max(float(s.counts.sum()), 1.0)
        entropy = float(-(load[load > 0] * load[load > 0].log()).sum())
        layers[str(layer)] = {
            "tokens": s.tokens,
            "counts": [int(c) for c in s.counts.tolist()],
            "token_share": (s.counts / tokens).tolist(),
            "gate_mean": (s.gate_sum / tokens).tolist(),
            "gate_sum": s.gate_sum.tolist(),
            "entropy": entropy,
            "max_entropy": math.log(s.num_experts),
        }
    return {"version": VERSION, "top_k": top_k, **meta, "layers": layers}


def profile_key(parts: dict[str, Any]) -> str:
    """Cache key of a profile: the model, the data, and how tokens were sampled and counted."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def read_profile(directory: Path, key: str | None = None) -> dict[str, Any] | None:
    """The cached profile (for `key`, when given); a damaged cache reads as none, and is computed again."""
    path = directory / "profile.json"
    if not path.is_file():
        return None
    try:
        profile = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(profile, dict) or not {"key", "rows", "count", "top_k"} <= set(profile):
        return None
    return profile if key is None or profile.get("key") == key else None


def write_profile(directory: Path, profile: dict[str, Any], title: str = "routing profile") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    out = csv.writer(table)
    out.writerow(["layer", "expert", "rank", "tokens", "token_share", "gate_mean", "gate_sum"])
    for layer, d in profile["layers"].items():
        order = sorted(range(len(d["counts"])), key=lambda e: (-d["token_share"][e], e))
        for rank, e in enumerate(order, start=1):
            out.writerow([layer, e, rank, d["counts"][e], f"{d['token_share'][e]:.6f}",
                          f"{d['gate_mean'][e]:.6f}", f"{d['gate_sum'][e]:.6f}"])
    write_atomic(directory / "profile.csv", table.getvalue().encode())
    heatmap(profile, directory / "heatmap.png", title)
    write_atomic(directory / "profile.json", json.dumps(profile, indent=1) + "\n")  # last: a whole profile's mark


def share_matrix(profile: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    layers = sorted(int(k) for k in profile["layers"])
    return layers, torch.tensor([profile["layers"][str(layer)]["token_share"] for layer in layers])


def heatmap(profile: dict[str, Any], path: Path, title: str, diff_from: dict[str, Any] | None = None,
            selected: dict[Any, list[int] | None] | None = None, vmax: float | None = None) -> Any:
    """Layers x experts image of token share (or of its change against `diff_from`, on a scale centred on
    zero); the experts in `selected` ({layer: expert ids}, those that carry the adapter) are marked with a dot. `vmax`:
    the top of the share scale, so that maps meant to be compared (before / after training) share one.
    Title and labels are laid out to fit the figure (constrained layout, the title wrapped to its width).
    Returns the (layer, expert) pairs marked."""
    import textwrap

    from matplotlib.figure import Figure

    layers, share = share_matrix(profile)
    cmap, label, vmin = "viridis", "token share (0-1)", 0.0
    if diff_from is not None:
        share = share - share_matrix(diff_from)[1]
        bound = float(share.abs().max()) or 1.0
        cmap, label, vmin, vmax = "coolwarm", "share change", -bound, bound
    width = max(6.0, min(4 + 0.12 * share.shape[1], 24))
    fig = Figure(figsize=(width, max(3.0, 1.8 + 0.3 * len(layers))), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share.numpy(), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    boxed = []
    if selected:
        chosen = {str(layer): ids for layer, ids in selected.items()}  # plan.json's keys are strings
        for row, layer in enumerate(layers):
            if str(layer) not in chosen:
                continue
            ids = chosen[str(layer)]
            for expert in range(share.shape[1]) if ids is None else ids:  # None: every expert of the layer
                boxed.append((layer, expert))
        # a filled dot in the middle of each chosen cell: it cannot be read as its neighbour's, as an outline on
        # the shared edge of two cells can
        ax.scatter([e for _, e in boxed], [layers.index(layer) for layer, _ in boxed], s=min(60.0, 900.0 / share.shape[1]),
                   c="white", edgecolors="black", linewidths=0.8, marker="o", zorder=3)
        title += " - dots: experts with the adapter"
    full = f"{title} ({profile.get('tokens_counted', '?')} tokens, top-{profile['top_k']})"
    ax.set_title("\n".join(textwrap.wrap(full, width=int(width * 9))), fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return boxed


def share_max(*profiles: dict[str, Any]) -> float:
    """The largest token share in any of `profiles`: one colour scale for maps compared side by side."""
    return max(float(share_matrix(p)[1].max()) for p in profiles) or 1.0


def load_moved(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Per layer, the share of the expert load that moved: total variation between the two load
    distributions (token share / top_k), in [0, 1]."""
    k = before["top_k"]
    return {layer: 0.5 * sum(abs(a - b) for a, b in zip(after["layers"][layer]["token_share"], d["token_share"],
                                                         strict=True)) / k
            for layer, d in before["layers"].items()}


def diff_table(before: dict[str, Any], after: dict[str, Any], data: str, top: int = 3):
    """Per layer: how much of the load moved (total variation between the two load distributions, in
    [0, 1]) and which experts gained and lost the most token share; `data` names what was routed."""
    from rich.table import Table

    table = Table(title=f"routing change after training, on {data} (token share, after - before)")
    for col in ("layer", "load moved", f"top {top} gains", f"top {top} losses"):
        table.add_column(col)
    moved_by_layer = load_moved(before, after)
    for layer in sorted(before["layers"], key=int):
        b, a = before["layers"][layer]["token_share"], after["layers"][layer]["token_share"]
        delta = [x - y for x, y in zip(a, b, strict=True)]
        moved = moved_by_layer[layer]
        order = sorted(range(len(delta)), key=lambda e: (-delta[e], e))
        gains = ", ".join(f"{e}:{delta[e]:+.3f}" for e in order[:top] if delta[e] > 0)
        losses = ", ".join(f"{e}:{delta[e]:+.3f}" for e in reversed(order[-top:]) if delta[e] < 0)
        table.add_row(layer, f"{moved:.1%}", gains or "-", losses or "-")
    return table


def summary_table(profile: dict[str, Any], top: int = 6):
    """A rich table: per layer the top experts by token share and by mean gate value, and the entropy."""
    from rich.table import Table

    table = Table(title=f"routing profile: {profile.get('tokens_counted', '?')} tokens ({profile.get('count', '')})")
    for col in ("layer", f"top {top} by token share", f"top {top} by mean gate", "entropy / uniform"):
        table.add_column(col)
    for layer, d in sorted(profile["layers"].items(), key=lambda kv: int(kv[0])):
        ranked = lambda key: sorted(range(len(d[key])), key=lambda e: (-d[key][e], e))[:top]  # noqa: E731
        shares = ", ".join(f"{e}:{d['token_share'][e]:.2f}" for e in ranked("token_share"))
        gates = ", ".join(f"{e}:{d['gate_mean'][e]:.3f}" for e in ranked("gate_mean"))
        table.add_row(layer, shares, gates, f"{d['entropy']:.2f} / {d['max_entropy']:.2f}")
    return table
