"""ncppo.plots: the shared line-plot helper (labels, round ticks, legend, intervals, PNG size)."""

import math
import subprocess
import sys

import pytest
from PIL import Image

from ncppo.plots import Panel, line_plot, multi_panel

# the demo's old y ticks read 6.64, 6.26, 5.88: data with such odd values must still get round ticks
CURVES = {"latent-DPO": [(0, 5.706, 5.21, 6.13), (25, 6.64, 6.31, 6.93), (50, 6.26, 5.88, 6.61), (200, 5.88, 5.47, 6.2)],
          "NCP-DPO": [(0, 5.706, 5.21, 6.13), (100, 5.93, 5.52, 6.27), (200, 6.087, 5.77, 6.41)]}


def _visible(values, limits):
    lo, hi = sorted(limits)
    return [v for v in values if lo - 1e-9 <= v <= hi + 1e-9]


def shown(ax, axis="y"):
    """The tick labels inside the axis's view (matplotlib also labels ticks just outside it)."""
    a = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = sorted(a.get_view_interval())
    return [t.get_text() for t in a.get_ticklabels() if lo - 1e-9 <= t.get_position()[axis == "y"] <= hi + 1e-9]


def assert_round_ticks(ticks, limits):
    """At least 3 ticks in view, evenly spaced by 1, 2, 2.5 or 5 x 10^k, each a multiple of it."""
    ticks = _visible(ticks, limits)
    assert len(ticks) >= 3, ticks
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 2.5, 5)), (step, ticks)
    for a, b in zip(ticks, ticks[1:]):
        assert b - a == pytest.approx(step)
    for t in ticks:
        assert t / step == pytest.approx(round(t / step), abs=1e-6), (t, step)


def test_line_plot_png_labels_legend_and_round_ticks(tmp_path):
    path = tmp_path / "sub" / "curve.png"
    fig = line_plot(path, CURVES, xlabel="training step", ylabel="mean judge score", title="held out",
                    hline=6.0, hline_label="latent-DPO final", colors={"NCP-DPO": "#1e5ac8"})
    assert Image.open(path).size == (700, 420) and Image.open(path).format == "PNG"
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), fig._suptitle.get_text()) == ("training step", "mean judge score",
                                                                           "held out")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["latent-DPO", "NCP-DPO", "latent-DPO final"]
    assert_round_ticks(list(ax.get_yticks()), ax.get_ylim())
    assert_round_ticks(list(ax.get_xticks()), ax.get_xlim())
    labels = shown(ax)
    assert labels and all(len(text.partition(".")[2]) <= 2 for text in labels), labels
    assert shown(ax, "x")[:3] == ["0", "50", "100"]
    # one shaded band per series, covering each interval: every point's lo..hi is inside it
    bands = ax.collections
    assert len(bands) == 2
    for band, points in zip(bands, CURVES.values()):
        (x0, y0), (x1, y1) = band.get_paths()[0].get_extents().get_points()
        assert y0 == pytest.approx(min(p[2] for p in points)) and y1 == pytest.approx(max(p[3] for p in points))
    assert fig.get_size_inches() * fig.dpi == pytest.approx([700, 420])


def test_multi_panel_shares_x_and_formats_percentages(tmp_path):
    path = tmp_path / "iterate.png"
    rounds = range(4)
    panels = [
        Panel({"proxy reward": [(r, 5 + 0.31 * r, 4.83 + 0.31 * r, 5.17 + 0.31 * r) for r in rounds],
               "gold reward": [(r, 5 + 0.07 * r, 4.8 + 0.07 * r, 5.21 + 0.07 * r) for r in rounds]},
              ylabel="mean reward"),
        dict(series={"win rate vs base": [(r, 0.5 + 0.073 * r, 0.41 + 0.07 * r, 0.59 + 0.076 * r) for r in rounds]},
             ylabel="win rate vs base", percent=True, hline=0.5, hline_label="parity"),
    ]
    fig = multi_panel(path, panels, xlabel="round", title="iterated DPO")
    top, bottom = fig.axes
    assert Image.open(path).size == (700, 740)  # 7 x (2 x 3.2 + 0.6 + 0.4) inches at 100 dpi
    assert (top.get_ylabel(), bottom.get_ylabel()) == ("mean reward", "win rate vs base")
    assert (top.get_xlabel(), bottom.get_xlabel()) == ("", "round")
    assert top.get_shared_x_axes().joined(top, bottom)
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == ["win rate vs base", "parity"]
    assert_round_ticks(list(top.get_yticks()), top.get_ylim())
    assert_round_ticks(list(bottom.get_yticks()), bottom.get_ylim())
    labels = shown(bottom)
    assert "50%" in labels and all(t.endswith("%") and "." not in t for t in labels), labels
    assert shown(bottom, "x") == ["0", "1", "2", "3"]


def test_log_x_error_bars_and_empty_series(tmp_path):
    scan = {"latent-DPO": [(0.1, 5.8, 5.2, 6.5), (0.3, 5.92, 5.9, 5.94), (1.0, 5.84, 4.7, 7.0), (100.0, 5.7, 4.9, 6.5)]}
    fig = line_plot(tmp_path / "scan.png", scan, xlabel="normalised beta", ylabel="score", log_x=True,
                    intervals="bars")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert shown(ax, "x") == ["0.1", "1", "10", "100"]
    assert len(ax.collections) == 1 and len(ax.collections[0].get_segments()) == 4  # one error bar per point
    fig = line_plot(tmp_path / "empty.png", {"a": []}, xlabel="x", ylabel="y")
    assert "no data points" in [t.get_text() for t in fig.axes[0].texts]
    with pytest.raises(ValueError, match="band"):
        line_plot(None, scan, xlabel="x", ylabel="y", intervals="shade")


def test_importing_the_cli_loads_no_matplotlib():
    code = ("import sys, ncppo.cli, ncppo.plots, ncppo.toy.demo, ncppo.toy.figures, ncppo.toy.study_report; "
            "print(sorted(m for m in sys.modules if m.startswith('matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
