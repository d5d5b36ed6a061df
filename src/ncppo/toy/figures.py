"""The demo's two figures, drawn with PIL: a sample grid and a score-over-steps plot."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"latent": (200, 90, 20), "ncp": (30, 90, 200)}
NAMES = {"latent": "latent-DPO", "ncp": "NCP-DPO"}


def sample_grid(rows: dict[str, list[Image.Image]], labels: list[str], scale: int = 3) -> Image.Image:
    """One row per model (same prompts and seeds per column), upscaled `scale`x, labelled on the left."""
    font = ImageFont.load_default()
    keys = list(rows)
    w, h = rows[keys[0]][0].size
    cell_w, cell_h, left = w * scale + 2, h * scale + 2, 80
    n = max(len(v) for v in rows.values())
    grid = Image.new("RGB", (left + n * cell_w, len(keys) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for r, (key, label) in enumerate(zip(keys, labels)):
        draw.text((4, r * cell_h + cell_h // 2 - 5), label, fill=(0, 0, 0), font=font)
        for c, img in enumerate(rows[key]):
            grid.paste(img.resize((w * scale, h * scale), Image.NEAREST), (left + c * cell_w + 1, r * cell_h + 1))
    return grid


def curve_plot(histories: dict[str, list[dict]], target: float | None = None, size=(560, 360)) -> Image.Image:
    """Mean judge score on the held-out prompts against training step, one line per method."""
    font = ImageFont.load_default()
    W, H = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    points = [(h["step"], h["mean_score"]) for hist in histories.values() for h in hist]
    if not points:
        draw.text((left, H // 2), "no evaluation points", fill=(0, 0, 0), font=font)
        return img
    xmax = max(1, max(p[0] for p in points))
    ys = [p[1] for p in points] + ([target] if target is not None else [])
    ymin, ymax = min(ys), max(ys)
    pad = max(0.05, 0.1 * (ymax - ymin))
    ymin, ymax = ymin - pad, ymax + pad

    def xy(step, score):
        return (left + (W - left - right) * step / xmax, top + (H - top - bottom) * (ymax - score) / (ymax - ymin))

    draw.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for k in range(5):
        score = ymin + (ymax - ymin) * k / 4
        _, y = xy(0, score)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{score:.2f}", fill=(0, 0, 0), font=font)
        step = round(xmax * k / 4)
        x, _ = xy(step, ymin)
        draw.line([x, H - bottom, x, H - bottom + 4], fill=(0, 0, 0))
        draw.text((x - 8, H - bottom + 6), str(step), fill=(0, 0, 0), font=font)
    draw.text((W // 2 - 20, H - 16), "step", fill=(0, 0, 0), font=font)
    draw.text((left, 8), "mean toy-judge score, held-out prompts", fill=(0, 0, 0), font=font)
    if target is not None:
        _, y = xy(0, target)
        for x in range(left, W - right, 8):
            draw.line([x, y, x + 4, y], fill=(150, 150, 150))
    for i, (key, hist) in enumerate(histories.items()):
        colour = COLOURS.get(key, (0, 0, 0))
        line = [xy(h["step"], h["mean_score"]) for h in hist]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((W - right - 110, top + 8 + 14 * i), NAMES.get(key, key), fill=colour, font=font)
    return img
