"""Line plots with 95% intervals, drawn with matplotlib, for every figure ncppo writes.

One point is `(x, y, lo, hi)`: `lo`/`hi` bound the point's interval (None: no interval). A
series is a list of points; a panel is named series sharing one y axis. Axes are labelled,
ticks are round numbers (1, 2, 2.5 or 5 x 10^k apart), intervals are shaded bands (or error
bars), and a legend names every series and the reference line.

    from ncppo.plots import Panel, line_plot, multi_panel

    line_plot("score.png", {"NCP-DPO": [(0, 5.6, 5.4, 5.8), (25, 5.9, 5.6, 6.2)]},
              xlabel="training step", ylabel="mean judge score", title="held-out score", hline=5.6,
              hline_label="base")
    multi_panel("iterate.png", [
        Panel({"proxy reward": proxy, "gold reward": gold}, ylabel="mean reward"),
        Panel({"win rate vs base": wins}, ylabel="win rate vs base", percent=True, hline=0.5,
              hline_label="parity"),
    ], xlabel="round", title="iterated DPO")

Both return the matplotlib Figure (`path=None` only builds it). pyplot is never used (no
global state, no GUI backend): figures are `matplotlib.figure.Figure` objects rendered by Agg,
and matplotlib is imported on first use, so importing ncppo costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

Point = tuple  # (x, y, lo | None, hi | None)

#: 1, 2, 2.5, 5 x 10^k: the tick spacings allowed on linear axes.
NICE_STEPS = [1, 2, 2.5, 5, 10]
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


@dataclass
class Panel:
    """One y axis of a figure: named series of `(x, y, lo, hi)` points and how to draw them.

    `intervals`: "band" (shaded between lo and hi, for curves) or "bars" (error bars, for
    separate settings such as a beta grid). `percent`: y values are fractions, ticks read 50%.
    `hline`: a dashed reference line (the base model, parity), named `hline_label` in the legend.
    """

    series: dict[str, Sequence[Point]]
    ylabel: str
    title: str | None = None
    hline: float | None = None
    hline_label: str | None = None
    intervals: str = "band"
    percent: bool = False
    ylim: tuple[float, float] | None = None
    colors: dict[str, str] = field(default_factory=dict)


def line_plot(path: str | Path | None, series: dict[str, Sequence[Point]], *, xlabel: str, ylabel: str,
              title: str | None = None, hline: float | None = None, hline_label: str | None = None,
              log_x: bool = False, intervals: str = "band", percent: bool = False,
              colors: dict[str, str] | None = None, size: tuple[float, float] = (7.0, 4.2), dpi: int = 100):
    """One panel of series (see `Panel`); writes a PNG of `size` inches x `dpi` pixels to `path`
    (e.g. 700 x 420) and returns the Figure."""
    panel = Panel(series=series, ylabel=ylabel, hline=hline, hline_label=hline_label, intervals=intervals,
                  percent=percent, colors=dict(colors or {}))
    return multi_panel(path, [panel], xlabel=xlabel, title=title, log_x=log_x, size=size, dpi=dpi)


def multi_panel(path: str | Path | None, panels: Sequence[Panel | dict], *, xlabel: str, title: str | None = None,
                log_x: bool = False, size: tuple[float, float] | None = None, dpi: int = 100):
    """Panels stacked vertically, sharing the x axis (labelled once, at the bottom); each has
    its own y label, intervals and legend. `panels` may be dicts of `Panel`'s fields. Default
    size: 7 inches wide, 3.2 inches per panel + 0.4 (+ 0.6 more with a title)."""
    from matplotlib.figure import Figure

    panels = [p if isinstance(p, Panel) else Panel(**p) for p in panels]
    if not panels:
        raise ValueError("multi_panel needs at least one panel")
    if size is None:
        size = (7.0, 3.2 * len(panels) + (0.6 if title else 0.0) + 0.4)
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, log_x=log_x)
    axes[-1].set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig


def _draw_panel(ax, panel: Panel, *, log_x: bool) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if panel.intervals not in ("band", "bars"):
        raise ValueError(f"intervals must be 'band' or 'bars', got {panel.intervals!r}")
    xs_all = []
    for i, (name, points) in enumerate(panel.series.items()):
        pts = sorted(((tuple(p) + (None, None))[:4] for p in points), key=lambda p: p[0])
        if not pts:
            continue
        colour = panel.colors.get(name, PALETTE[i % len(PALETTE)])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xs_all += xs
        with_ci = [p for p in pts if p[2] is not None and p[3] is not None]
        if panel.intervals == "band" and len(with_ci) > 1:
            ax.fill_between([p[0] for p in with_ci], [p[2] for p in with_ci], [p[3] for p in with_ci],
                            color=colour, alpha=0.2, linewidth=0)
        elif with_ci:  # bars, or a band of a single point
            ax.errorbar([p[0] for p in with_ci], [p[1] for p in with_ci],
                        yerr=[[p[1] - p[2] for p in with_ci], [p[3] - p[1] for p in with_ci]],
                        fmt="none", ecolor=colour, elinewidth=1.2, capsize=3)
        ax.plot(xs, ys, color=colour, marker="o", markersize=4, linewidth=2, label=name)
    if panel.hline is not None:
        ax.axhline(panel.hline, color="0.45", linestyle="--", linewidth=1.2, label=panel.hline_label)
    if not xs_all:
        ax.text(0.5, 0.5, "no data points", transform=ax.transAxes, ha="center", va="center")
    ax.set_ylabel(panel.ylabel)
    if panel.title:
        ax.set_title(panel.title)
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=NICE_STEPS))
    if panel.percent:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(100 * v, 6):g}%"))
    else:
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        integer = bool(xs_all) and all(float(x).is_integer() for x in xs_all)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=NICE_STEPS, integer=integer))
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", frameon=False)
