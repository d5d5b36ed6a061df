"""The toy world's figures, drawn with PIL: sample grids, score curves with 95% bands, grid scans."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"latent": (200, 90, 20), "ncp": (30, 90, 200), "latent-DPO": (200, 90, 20), "NCP-DPO": (30, 90, 200)}
NAMES = {"latent": "latent-DPO", "ncp": "NCP-DPO"}
_EXTRA = [(40, 150, 60), (150, 50, 150), (120, 120, 20), (20, 140, 140)]


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


class _Axes:
    """A plot frame: data -> pixel coordinates, ticks and labels."""

    def __init__(self, size, xs, ys, *, title: str, xlabel: str, log_x: bool = False):
        self.font = ImageFont.load_default()
        self.W, self.H = size
        self.left, self.right, self.top, self.bottom = 60, 20, 30, 40
        self.img = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.img, "RGBA")
        self.log_x = log_x
        tx = [self._tx(x) for x in xs]
        self.xmin, self.xmax = min(tx), max(tx)
        if self.xmax == self.xmin:
            self.xmax = self.xmin + 1
        ymin, ymax = min(ys), max(ys)
        pad = max(0.05, 0.1 * (ymax - ymin))
        self.ymin, self.ymax = ymin - pad, ymax + pad
        d = self.draw
        d.rectangle([self.left, self.top, self.W - self.right, self.H - self.bottom], outline=(0, 0, 0))
        for k in range(5):
            y_value = self.ymin + (self.ymax - self.ymin) * k / 4
            _, y = self.xy(xs[0], y_value)
            d.line([self.left - 4, y, self.left, y], fill=(0, 0, 0))
            d.text((4, y - 6), f"{y_value:.2f}", fill=(0, 0, 0), font=self.font)
        ticks = sorted(set(xs)) if log_x else [self.xmin + (self.xmax - self.xmin) * k / 4 for k in range(5)]
        for x_value in ticks:
            x, _ = self.xy(x_value, self.ymin)
            d.line([x, self.H - self.bottom, x, self.H - self.bottom + 4], fill=(0, 0, 0))
            d.text((x - 8, self.H - self.bottom + 6), f"{x_value:g}" if log_x else str(round(x_value)),
                   fill=(0, 0, 0), font=self.font)
        d.text((self.W // 2 - 3 * len(xlabel), self.H - 16), xlabel, fill=(0, 0, 0), font=self.font)
        d.text((self.left, 8), title, fill=(0, 0, 0), font=self.font)

    def _tx(self, x):
        return math.log10(x) if self.log_x else x

    def xy(self, x, y):
        return (self.left + (self.W - self.left - self.right) * (self._tx(x) - self.xmin) / (self.xmax - self.xmin),
                self.top + (self.H - self.top - self.bottom) * (self.ymax - y) / (self.ymax - self.ymin))

    def legend(self, i: int, name: str, colour) -> None:
        self.draw.text((self.W - self.right - 110, self.top + 8 + 14 * i), name, fill=colour, font=self.font)


def _colour(key: str, i: int):
    return COLOURS.get(key, _EXTRA[i % len(_EXTRA)])


def band_plot(series: dict[str, list[tuple]], target: float | None = None, *, title: str = "mean toy-judge score",
              xlabel: str = "step", size=(560, 360)) -> Image.Image:
    """Lines of (x, mean, low, high) points, one per key, each with its shaded 95% band; an
    optional dashed horizontal line at `target`."""
    points = [p for s in series.values() for p in s]
    if not points:
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).text((60, size[1] // 2), "no evaluation points", fill=(0, 0, 0))
        return img
    ys = [v for p in points for v in p[1:4] if v is not None] + ([target] if target is not None else [])
    ax = _Axes(size, [p[0] for p in points], ys, title=title, xlabel=xlabel)
    for i, (key, pts) in enumerate(series.items()):
        colour = _colour(key, i)
        pts = sorted(pts)
        if len(pts) > 1 and all(p[2] is not None for p in pts):
            poly = [ax.xy(p[0], p[3]) for p in pts] + [ax.xy(p[0], p[2]) for p in reversed(pts)]
            ax.draw.polygon(poly, fill=colour + (50,))
    if target is not None:
        _, y = ax.xy(points[0][0], target)
        for x in range(ax.left, ax.W - ax.right, 8):
            ax.draw.line([x, y, x + 4, y], fill=(150, 150, 150))
    for i, (key, pts) in enumerate(series.items()):
        colour = _colour(key, i)
        line = [ax.xy(p[0], p[1]) for p in sorted(pts)]
        if len(line) > 1:
            ax.draw.line(line, fill=colour, width=2)
        for x, y in line:
            ax.draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ax.legend(i, NAMES.get(key, key), colour)
    return ax.img


def grid_plot(series: dict[str, list[tuple]], *, title: str = "validation judge score vs normalised beta "
              "(bars: 95% CI of the difference from the best)", size=(560, 360)) -> Image.Image:
    """Points (beta, mean, low, high) per key on a log-beta axis, joined, with error bars."""
    points = [p for s in series.values() for p in s]
    ax = _Axes(size, [p[0] for p in points], [v for p in points for v in p[1:4]], title=title,
               xlabel="normalised beta", log_x=True)
    for i, (key, pts) in enumerate(series.items()):
        colour = _colour(key, i)
        pts = sorted(pts)
        line = [ax.xy(p[0], p[1]) for p in pts]
        if len(line) > 1:
            ax.draw.line(line, fill=colour, width=2)
        for p, (x, y) in zip(pts, line):
            _, y_lo = ax.xy(p[0], p[2])
            _, y_hi = ax.xy(p[0], p[3])
            ax.draw.line([x, y_lo, x, y_hi], fill=colour, width=1)
            ax.draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ax.legend(i, key, colour)
    return ax.img
