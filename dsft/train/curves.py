"""curves.png: a run's metrics.jsonl over optimizer steps, one panel per quantity: the objective's panels
(dsft.train.pipeline.Objective.panels: loss with its eval points and learning rate for every objective;
the preference objectives add their rewards). `series` picks the points and `build_figure` draws exactly
those, so a test can hold the picture to the log."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

Panels = dict[str, tuple[tuple[str, str], ...]]  # panel title -> (line label, metrics.jsonl key) drawn in it


def series(rows: list[dict[str, Any]], panels: Panels) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """panel -> line -> (steps, values), from the rows that log each key (a line nothing logged is left out)."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for title, lines in panels.items():
        for label, key in lines:
            points = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                out.setdefault(title, {})[label] = (list(steps), list(values))
    return out


# the y axis of the panels every objective shares, with units; any other panel's title is its label
YLABELS = {"loss": "loss (nats per token)", "learning rate": "learning rate", "reward accuracy": "share of pairs",
           "reward margin (chosen - rejected)": "beta x log-ratio (nats)"}


def constant(lines: dict[str, tuple[list[int], list[float]]]) -> float | None:
    """The one value every point of a panel has (a constant learning rate), else None."""
    values = {v for _, vs in lines.values() for v in vs}
    return next(iter(values)) if len(values) == 1 and sum(len(vs) for _, vs in lines.values()) > 1 else None


def build_figure(rows: list[dict[str, Any]], panels: Panels, title: str = "") -> Any:
    """A matplotlib Figure (no pyplot state) with one axis per panel of `series`, each with its y label; a
    panel whose every point is one value (a constant learning rate) is said in the title instead."""
    from matplotlib.figure import Figure

    data = series(rows, panels)
    flat = {panel: value for panel, lines in data.items() if (value := constant(lines)) is not None}
    data = {panel: lines for panel, lines in data.items() if panel not in flat}
    fig = Figure(figsize=(5.0 * max(1, len(data)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(data)), squeeze=False)[0]
    for ax, (panel, lines) in zip(axes, data.items()):
        for label, (steps, values) in lines.items():
            ax.plot(steps, values, marker="o" if label == "eval" or len(steps) < 3 else None, markersize=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(YLABELS.get(panel, panel))
        if len(lines) > 1:
            ax.legend()
    if not data:
        axes[0].set_title("no metrics logged")
    notes = "; ".join(f"{panel} constant at {value:.3g}" for panel, value in flat.items())
    if title or notes:
        fig.suptitle(" - ".join(t for t in (title, notes) if t))
    return fig


def write_curves(run: Path, kind: str, panels: Panels) -> Path:
    """Draw RUN/metrics.jsonl into RUN/curves.png (written beside it, then renamed)."""
    from dsft.train import run_dir
    from dsft.train.callbacks import read_metrics

    path = run_dir.metrics(run)
    rows = read_metrics(path)[0] if path.is_file() else []
    return save_figure(build_figure(rows, panels, f"dsft {kind}: {Path(run).name}"), run_dir.curves(run))


def save_figure(fig: Any, path: Path) -> Path:
    """A figure as PNG at `path`: written beside it, then renamed (never a half-written picture)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
