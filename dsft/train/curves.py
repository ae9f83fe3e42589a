"""curves.png: a run's metrics.jsonl over optimizer steps, one panel per quantity: the objective's panels
(dsft.train.objective.Objective.panels: loss with its eval points and learning rate for every objective;
the preference objectives add their rewards). `series` picks the points and `build_figure` draws exactly
those, so a test can hold the picture to the log."""

from __future__ import annotations

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


# the y axis of the panels every objective shares, with units; any other panel's title is its label. The loss
# panel's unit is the objective's (Objective.loss_unit): nats per token for SFT, a loss per pair for DPO, ...
YLABELS = {"loss": "loss (nats per token)", "learning rate": "learning rate", "reward accuracy": "share of pairs",
           "reward margin (chosen - rejected)": "beta x log-ratio (nats)"}
COLUMNS = 3  # panels per row: a 5-panel figure is 3 + 2, readable when scaled, not 5 in a strip
MIN_SPAN = 0.05  # a panel's y range is at least this share of its values' size: 15.8-16.0 is not drawn as a swing


def constant(lines: dict[str, tuple[list[int], list[float]]]) -> float | None:
    """The one value every point of a panel has (a constant learning rate), else None."""
    values = {v for _, vs in lines.values() for v in vs}
    return next(iter(values)) if len(values) == 1 and sum(len(vs) for _, vs in lines.values()) > 1 else None


def _honest_range(ax: Any, lines: dict[str, tuple[list[int], list[float]]]) -> None:
    """Widen a y range narrower than MIN_SPAN of the values' size (around their middle), so that a change of
    1% does not fill the panel."""
    values = [v for _, vs in lines.values() for v in vs]
    low, high = min(values), max(values)
    size = max(abs(low), abs(high))
    if size > 0 and high - low < MIN_SPAN * size:
        middle, half = (low + high) / 2, MIN_SPAN * size / 2
        ax.set_ylim(middle - half, middle + half)


def build_figure(rows: list[dict[str, Any]], panels: Panels, title: str = "", ylabels: dict[str, str] | None = None) -> Any:
    """A matplotlib Figure (no pyplot state) with one axis per panel of `series`, COLUMNS to a row, each with
    its y label (`ylabels` overrides YLABELS: the objective's units), whole steps on the x axis, and no range
    that makes a small change look large; a panel whose every point is one value (a constant learning rate) is
    said in the title instead."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels = {**YLABELS, **(ylabels or {})}
    data = series(rows, panels)
    flat = {panel: value for panel, lines in data.items() if (value := constant(lines)) is not None}
    data = {panel: lines for panel, lines in data.items() if panel not in flat}
    count = max(1, len(data))
    columns = min(COLUMNS, count)
    grid = -(-count // columns)
    width, height = 4.6 * columns, 3.4 * grid
    fig = Figure(figsize=(width, height))
    # fixed margins in inches (room for the y label and tick labels, the panel title, the figure's title and the x
    # label): matplotlib's constrained layout measured every text and took half the time of drawing the figure
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.6 / height,
                        wspace=1.05 / (width / columns - 1.05), hspace=0.95 / (height / grid - 0.95))
    axes = list(fig.subplots(grid, columns, squeeze=False).flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    for ax, (panel, lines) in zip(axes, data.items()):
        for label, (steps, values) in lines.items():
            ax.plot(steps, values, marker="o" if label == "eval" or len(steps) < 3 else None, markersize=3, label=label)
        ax.set_title(panel, fontsize="medium")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(labels.get(panel, panel))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _honest_range(ax, lines)
        if len(lines) > 1:
            ax.legend(fontsize="small")
    if not data:
        axes[0].set_title("no metrics logged")
    notes = "; ".join(f"{panel} constant at {value:.3g}" for panel, value in flat.items())
    if title or notes:
        fig.suptitle(" - ".join(t for t in (title, notes) if t))
    return fig


def write_curves(run: Path, kind: str, panels: Panels, ylabels: dict[str, str] | None = None) -> Path:
    """Draw RUN/metrics.jsonl into RUN/curves.png (written beside it, then renamed)."""
    from dsft.runs import run_dir
    from dsft.runs.metrics import read_metrics

    path = run_dir.metrics(run)
    rows = read_metrics(path)[0] if path.is_file() else []
    return save_figure(build_figure(rows, panels, f"dsft {kind}: {Path(run).name}", ylabels), run_dir.curves(run))


def save_figure(fig: Any, path: Path) -> Path:
    """A figure as PNG at `path`, written atomically (never a half-written picture)."""
    from dsft.outputs import write_atomic

    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
