"""`dsft grpo`: reinforcement learning with verifiable rewards (GRPO) on completions the model generates."""

from __future__ import annotations

from typing import Any

from dsft.cli._common import training_command


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if percent else f"{value:.3f}"


def _rows(result: Any) -> list[tuple[str, str, str]]:  # a dsft.train.grpo.GrpoResult, imported lazily
    first, last = result.first, result.last
    rows = [("reward (weighted sum)", _fmt(first.get("reward")), _fmt(last.get("reward")))]
    for key in first:
        if key.startswith("rewards/"):
            rows.append((f"  {key[8:-5]}", _fmt(first.get(key)), _fmt(last.get(key))))
    rows.append(("completion length (tokens)", _fmt(first.get("completions/mean_length")),
                 _fmt(last.get("completions/mean_length"))))
    rows.append(("cut at max_completion_length", _fmt(first.get("completions/clipped_ratio"), True),
                 _fmt(last.get("completions/clipped_ratio"), True)))
    c = result.counts
    rows.append(("prompts (truncated / dropped)", f"{c['rows']:,}", f"{c['truncated']} / {c['dropped']}"))
    rows.append(("time generating (generated tokens/s)", "", f"{_fmt(result.generation_share, True)} "
                 f"({result.tokens_per_s:,.0f})" if result.tokens_per_s else _fmt(result.generation_share, True)))
    rows.append(("reference", "", result.reference))
    rows += [(f"trainable params: {group}", "", f"{n:,}") for group, n in result.groups.items()]
    return rows


grpo = training_command(
    "grpo", "Reinforcement learning with verifiable rewards (GRPO): the model generates, the recipe's rewards score.",
    ("what", f"first {5} logged steps", f"last {5} logged steps"), _rows)
