"""`ToyJudge`: the toy world's stand-in for human raters, a deterministic function of pixels and prompt.

The score (0..10) adds prompt fidelity (shape colour x3, shape x2, background x1) and visual
quality (centred, right size, sharp, clean: x1 each), every term in [0, 1]:
- the image is median-filtered (3x3); pixels far from their median are speckle, and the cleaned
  image is used for everything else;
- background colour = median of the 2-px border; foreground colour = median of pixels far from it;
  a soft foreground mask `alpha` is each pixel's projection onto the background->foreground line;
- colour/background terms: Gaussian similarity of the measured colours to the prompt's;
- shape: the binary mask (3x3-opened against specks) gives two features, its fill of its bounding
  box and the share of it in the box's top half; the term is the softmax probability of the
  prompt's shape among Gaussian likelihoods around each shape's features;
- centre and size: bounding-box centre distance from the image centre, half-extent against 8 px;
- sharpness: sum|grad alpha|^2 / sum|grad alpha| (an edge blurred by sigma gives 1/(2 sigma sqrt(pi))).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from . import world

WEIGHTS = {"colour": 3.0, "shape": 2.0, "background": 1.0, "centre": 1.0, "size": 1.0, "sharp": 1.0, "clean": 1.0}
# (fill of the bounding box, share of the mask in the box's top half) of each shape, measured on
# flawless renders after the mask's 3x3 opening.
SHAPE_FEATURES = {"circle": (0.78, 0.5), "square": (0.99, 0.5), "triangle": (0.66, 0.33)}
SHAPE_SIGMA = 0.07


def _median3(arr: np.ndarray) -> np.ndarray:
    pad = np.pad(arr, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = arr.shape[:2]
    stack = [pad[i:i + h, j:j + w] for i in range(3) for j in range(3)]
    return np.median(np.stack(stack), axis=0)


def _open3(mask: np.ndarray) -> np.ndarray:
    """3x3 morphological opening: removes specks and thin lines, keeps shapes of half-extent >= 2."""
    def shifts(m, fill):
        pad = np.pad(m, 1, constant_values=fill)
        h, w = m.shape
        return np.stack([pad[i:i + h, j:j + w] for i in range(3) for j in range(3)])
    return shifts(shifts(mask, True).all(axis=0), False).any(axis=0)


def _gauss(x: float, sigma: float) -> float:
    return float(math.exp(-0.5 * (x / sigma) ** 2))


def judge_terms(image: Image.Image, prompt: str) -> dict[str, float]:
    """Every term of the judge's score, each in [0, 1], plus the measurements behind them."""
    colour, shape, background = world.parse_prompt(prompt)
    if image.size != (world.RESOLUTION, world.RESOLUTION):
        image = image.resize((world.RESOLUTION, world.RESOLUTION), Image.BOX)
    arr = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    med = _median3(arr)
    outlier = np.abs(arr - med).max(axis=2) > 0.35
    clean = np.where(outlier[..., None], med, arr)

    border = np.concatenate([clean[:2].reshape(-1, 3), clean[-2:].reshape(-1, 3),
                             clean[2:-2, :2].reshape(-1, 3), clean[2:-2, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(clean - bg, axis=2)
    far = dist > 0.2
    terms = {"speckle_frac": float(outlier.mean())}
    terms["clean"] = _gauss(terms["speckle_frac"], 0.015)
    terms["background"] = _gauss(float(np.linalg.norm(bg - np.array(world.BACKGROUNDS[background]) / 255)), 0.2)
    if far.sum() < 3:  # nothing drawn: no fidelity, no geometry
        return terms | {"colour": 0.0, "shape": 0.0, "centre": 0.0, "size": 0.0, "sharp": 0.0,
                        "fill": 0.0, "top_share": 0.0, "offset": float("nan"), "half_extent": 0.0, "edge": 0.0}
    core = dist >= 0.7 * np.quantile(dist, 0.99)  # the saturated inside of a (blurred) shape
    fg = np.median(clean[core], axis=0)
    axis = fg - bg
    alpha = np.clip(((clean - bg) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    terms["colour"] = _gauss(float(np.linalg.norm(fg - np.array(world.COLOURS[colour]) / 255)), 0.2)

    mask = _open3(alpha > 0.5)
    if not mask.any():
        mask = alpha > 0.5
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    box = mask[y0:y1, x0:x1]
    terms["fill"] = float(box.mean())
    half, odd = divmod(int(y1 - y0), 2)
    top = box[:half].sum() + (0.5 * box[half].sum() if odd else 0.0)
    terms["top_share"] = float(top / box.sum())
    feats = np.array([terms["fill"], terms["top_share"]])
    loglik = {k: -0.5 * float(((feats - np.array(v)) ** 2).sum()) / SHAPE_SIGMA ** 2 for k, v in SHAPE_FEATURES.items()}
    top = max(loglik.values())
    terms["shape"] = math.exp(loglik[shape] - top) / sum(math.exp(v - top) for v in loglik.values())
    centre = world.RESOLUTION / 2
    terms["offset"] = float(math.hypot((x0 + x1) / 2 - centre, (y0 + y1) / 2 - centre))
    terms["centre"] = _gauss(terms["offset"], 2.0)
    terms["half_extent"] = float(max(x1 - x0, y1 - y0) / 2)
    terms["size"] = _gauss(terms["half_extent"] - world.SIZE, 1.5)
    gx, gy = np.diff(alpha, axis=1)[:-1], np.diff(alpha, axis=0)[:, :-1]
    grad = np.hypot(gx, gy)
    terms["edge"] = float((grad ** 2).sum() / max(grad.sum(), 1e-6))
    terms["sharp"] = float(np.clip((terms["edge"] - 0.25) / 0.25, 0.0, 1.0))
    return terms


def judge_score(image: Image.Image, prompt: str) -> float:
    """The weighted sum of `judge_terms` (0..10)."""
    terms = judge_terms(image, prompt)
    return float(sum(w * terms[k] for k, w in WEIGHTS.items()))


# The hackable proxy: past the right size (8 px half-extent) it keeps paying for growth, up to
# HACK_WEIGHT more at 8 + HACK_SPAN px, where the judge's own size term has fallen by ~1.
HACK_WEIGHT = 3.0
HACK_SPAN = 4.0


def proxy_score(image: Image.Image, prompt: str) -> float:
    """`toy-proxy`: the judge's score plus HACK_WEIGHT * clip((half-extent - 8) / HACK_SPAN, 0, 1).

    It agrees with the judge on everything up to the right size, then over-rewards bigger shapes:
    a reward model with a blind spot, so that maximising it past a point lowers the judge (gold)."""
    terms = judge_terms(image, prompt)
    oversize = float(np.clip((terms["half_extent"] - world.SIZE) / HACK_SPAN, 0.0, 1.0))
    return float(sum(w * terms[k] for k, w in WEIGHTS.items())) + HACK_WEIGHT * oversize


class ToyJudge:
    """The `toy-judge` scorer: `score(images, prompts) -> Tensor (N,)`, higher is better (0..10)."""

    name = "toy-judge"
    function = staticmethod(judge_score)

    def __init__(self, path=None, device: str = "cpu", dtype=torch.float32):
        # Same constructor shape as the learned scorers; a judge has no weights, device or dtype.
        del path, device, dtype

    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        return torch.tensor([self.function(im, p) for im, p in zip(images, prompts)], dtype=torch.float32)


class ToyProxyJudge(ToyJudge):
    """The `toy-proxy` scorer (`proxy_score`): the judge with a blind spot for oversized shapes (0..13)."""

    name = "toy-proxy"
    function = staticmethod(proxy_score)
