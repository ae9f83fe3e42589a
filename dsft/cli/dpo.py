"""`dsft dpo`: preference alignment on chosen/rejected pairs."""

from __future__ import annotations

from typing import Any

from dsft.cli._common import training_command

REWARDS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def _rows(result: Any) -> list[tuple[str, str, str]]:  # a DpoResult, imported lazily
    fmt = lambda d, key: f"{d[key]:.3f}" if key in d else "-"  # noqa: E731
    rows = [(key, fmt(result.first, key), fmt(result.last, key)) for key in REWARDS
            if key in result.first or key in result.last]
    c = result.counts
    rows.append(("pairs (prompts truncated / dropped)", f"{c['pairs']:,}", f"{c['truncated']} / {c['dropped']}"))
    rows += [(f"trainable params: {group}", "", f"{n:,}") for group, n in result.groups.items()]
    return rows


dpo = training_command("dpo", "Align a model (or an SFT run, dpo.init_adapter) on preference pairs with DPO.",
                       ("what", "first step", "last step"), _rows)
