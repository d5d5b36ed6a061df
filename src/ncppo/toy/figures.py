"""The toy world's figures: sample grids (PIL), score curves and beta scans (`ncppo.plots`).

The grid stays in PIL: it pastes 32 px images nearest-neighbour upscaled, pixel for pixel, with
text labels; matplotlib would resample them and add nothing. The plots go through
`ncppo.plots` (axis labels, round ticks, legend, 95% intervals) with the toy's colours."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

NAMES = {"latent": "latent-DPO", "ncp": "NCP-DPO"}
COLOURS = {"latent-DPO": "#c85a14", "NCP-DPO": "#1e5ac8"}  # keyed by the names in the legend


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def sample_grid(rows: dict[str, list[Image.Image]], labels: list[str], scale: int = 3,
                columns: list[str] | None = None) -> Image.Image:
    """One row per model (same prompt and seed per column), upscaled `scale`x, labelled on the
    left; `columns` (e.g. the prompts) are written above the columns, wrapped."""
    font = ImageFont.load_default()
    keys = list(rows)
    w, h = rows[keys[0]][0].size
    cell_w, cell_h, left = w * scale + 2, h * scale + 2, 80
    n = max(len(v) for v in rows.values())
    wrapped = [_wrap(c, max(6, cell_w // 6)) for c in columns] if columns else []
    top = 4 + 11 * max(len(x) for x in wrapped) if wrapped else 0
    grid = Image.new("RGB", (left + n * cell_w, top + len(keys) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((left + c * cell_w + 2, 2 + 11 * k), line, fill=(0, 0, 0), font=font)
    for r, (key, label) in enumerate(zip(keys, labels)):
        draw.text((4, top + r * cell_h + cell_h // 2 - 5), label, fill=(0, 0, 0), font=font)
        for c, img in enumerate(rows[key]):
            grid.paste(img.resize((w * scale, h * scale), Image.NEAREST), (left + c * cell_w + 1, top + r * cell_h + 1))
    return grid


def score_curves(path, series: dict[str, list[tuple]], target: float | None = None, *, title: str,
                 target_label: str = "latent-DPO final score", ylabel: str = "mean toy-judge score"):
    """Score over training steps: (step, mean, low, high) points per space ("latent", "ncp") or
    name, shaded 95% bands, a dashed line at `target`; written to `path`, returns the Figure."""
    from ..plots import line_plot

    named = {NAMES.get(k, k): v for k, v in series.items()}
    return line_plot(path, named, xlabel="training step", ylabel=ylabel, title=title, hline=target,
                     hline_label=target_label if target is not None else None, colors=COLOURS)


def beta_scan(path, series: dict[str, list[tuple]], *, title: str = "DPO beta grids on the validation prompts\n"
              "bars: 95% CI of the difference from the grid's best, around each mean", ylabel: str = "mean toy-judge score (validation)"):
    """Points (beta, mean, low, high) per space on a log-beta axis, joined, with error bars."""
    from ..plots import line_plot

    named = {NAMES.get(k, k): v for k, v in series.items()}
    return line_plot(path, named, xlabel="normalised beta (units of the mean reference error)", ylabel=ylabel,
                     title=title, log_x=True, intervals="bars", colors=COLOURS)
