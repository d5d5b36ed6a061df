"""What evaluation runs leave behind besides scores: markdown tables and side-by-side grids."""

from __future__ import annotations

import html


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def markdown_table(results: dict, label_a: str = "A", label_b: str = "B") -> str:
    """A markdown table of `compare` results ({metric: {mean_a, mean_b, win_rate, ci, ...}})."""
    confidence = next(iter(results.values()), {}).get("confidence", 0.95)
    pct = f"{round(confidence * 100)}%"
    lines = [
        f"| metric | mean {label_a} | mean {label_b} | win rate {label_a} over {label_b} | {pct} CI | ties | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for metric, r in results.items():
        lo, hi = r["win_rate_ci"]
        lines.append(f"| {metric} | {_fmt(r['mean_a'])} | {_fmt(r['mean_b'])} | {100 * r['win_rate']:.1f}% "
                     f"| [{100 * lo:.1f}%, {100 * hi:.1f}%] | {r['ties']} | {r['n']} |")
    return "\n".join(lines)


def _caption(image, text: str, width: int):
    from PIL import Image, ImageDraw

    line_h = 12
    chars = max(8, width // 6)
    lines = [text[i:i + chars] for i in range(0, len(text), chars)][:3] or [""]
    canvas = Image.new("RGB", (width, image.height + line_h * len(lines) + 4), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((2, image.height + 2 + k * line_h), line, fill="black")
    return canvas


def grid_image(rows: list[dict], *, cell: int = 256):
    """One row per entry of `rows` ({prompt, image_a, image_b, caption_a, caption_b}): A left, B right,
    each image resized to `cell` pixels wide with its caption below; the prompt heads each row."""
    from PIL import Image, ImageDraw

    tiles = []
    for r in rows:
        pair = []
        for key in ("a", "b"):
            im = r[f"image_{key}"].convert("RGB")
            im = im.resize((cell, max(1, round(im.height * cell / im.width))))
            pair.append(_caption(im, r.get(f"caption_{key}", ""), cell))
        head_h = 16
        h = max(p.height for p in pair)
        tile = Image.new("RGB", (2 * cell + 4, h + head_h), "white")
        ImageDraw.Draw(tile).text((2, 2), r["prompt"][: (2 * cell) // 6], fill="black")
        tile.paste(pair[0], (0, head_h))
        tile.paste(pair[1], (cell + 4, head_h))
        tiles.append(tile)
    if not tiles:
        raise ValueError("no rows for the grid")
    out = Image.new("RGB", (tiles[0].width, sum(t.height + 4 for t in tiles)), "white")
    y = 0
    for t in tiles:
        out.paste(t, (0, y))
        y += t.height + 4
    return out


def grid_html(rows: list[dict], label_a: str, label_b: str) -> str:
    """An HTML side-by-side page; rows hold {prompt, src_a, src_b, caption_a, caption_b}."""
    esc = html.escape
    body = "\n".join(
        f"<tr><td>{esc(r['prompt'])}</td>"
        f"<td><img src=\"{esc(r['src_a'])}\" width=256><br>{esc(r.get('caption_a', ''))}</td>"
        f"<td><img src=\"{esc(r['src_b'])}\" width=256><br>{esc(r.get('caption_b', ''))}</td></tr>"
        for r in rows)
    return (f"<!doctype html><meta charset=utf-8><title>{esc(label_a)} vs {esc(label_b)}</title>\n"
            f"<table border=1><tr><th>prompt</th><th>{esc(label_a)}</th><th>{esc(label_b)}</th></tr>\n"
            f"{body}\n</table>\n")
