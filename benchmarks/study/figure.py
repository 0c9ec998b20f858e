"""The schedule-length figure of a study with series: each series' paired test difference to the baseline series
against the number of epochs, one panel for the selected single expert and one for the ensemble."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict

from .record import schedule_grid

_PANELS = (("single", "selected single expert"), ("ensemble", "ensemble of the experts"))


def plot_schedule(record: Dict[str, Any], path: Path) -> Path:
    """Write the figure of ``record`` (a study with series and a series baseline) to ``path`` (PNG).

    x: epochs (log scale, ticks at the lengths trained); y: test top-1 difference to the baseline series' single
    model of the same length, in points. Each seed is a point (shifted a little in x so seeds and series do not
    hide each other), each series' mean over seeds a line; the dashed line is no difference.
    """
    try:  # optional: only the results page needs it
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the schedule figure needs matplotlib; install the plots extra: "
                          "pip install 'ncl-hub[plots]'") from None
    epochs, grid = schedule_grid(record)
    series = [s for s in grid if s != record["baseline"]]
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (model, title) in zip(axes, _PANELS):
        for i, name in enumerate(series):
            _plot_series(ax, record, grid[name], model, record["series"][name], f"C{i}",
                         shift=0.04 * (i - (len(series) - 1) / 2))
        ax.axhline(0.0, color="0.3", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xticks(epochs, [str(e) for e in epochs])
        ax.minorticks_off()
        if epochs:
            ax.set_xlim(epochs[0] / 1.4, epochs[-1] * 1.4)
        ax.set_title(title)
        ax.set_xlabel("epochs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test top-1 minus {record['series'][record['baseline']]} (points)")
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=120, metadata={"Software": None})  # no version stamp: the same numbers give the same file
    return Path(path)


def _plot_series(ax, record: Dict[str, Any], at: Dict[int, str], model: str, label: str, color: str,
                 shift: float) -> None:
    """One series on one panel: its seeds as points, its mean per schedule length as a line (``label``)."""
    xs, means = [], []
    for epochs, method in at.items():
        stat = record["differences"][method]["vs_baseline_single"].get(f"test/{model}/top1")
        if not stat or stat["mean"] is None:
            continue
        values = stat["values"]
        for j, v in enumerate(values):
            if v is not None:
                ax.scatter(epochs * math.exp(shift + 0.015 * (j - (len(values) - 1) / 2)), v, color=color, s=14,
                           alpha=0.7, linewidths=0)
        xs.append(epochs * math.exp(shift))
        means.append(stat["mean"])
    ax.plot(xs, means, color=color, marker="o", markersize=3, linewidth=1.5, label=label)
