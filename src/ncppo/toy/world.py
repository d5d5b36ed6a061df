"""The toy image world: a small prompt grammar and a deterministic 32x32 renderer with flaws.

Prompts read "a {colour} {shape} on a {background} background". A render is fixed by a
`RenderSpec` (what is drawn, where, how big, how blurred, how speckled); `sample_spec` draws one
from a prompt, a seed and a set of flaws, so `render_prompt(prompt, seed, flaws)` is deterministic.

Prompt splits (`PROMPT_SPLITS`): the 36 prompts are split by (colour + 2 shape + background
index) mod 6 into `eval` (6 prompts, held out), `validation` (6, for choosing beta/lr) and `train` (24,
for preference pairs). The base model is pretrained on all 36 (as SD saw the whole web); the
preference stages never see the validation or eval prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RESOLUTION = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased, deterministic edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 238),
    "black": (22, 22, 22),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
FLAWS = ("colour", "shape", "background", "offcentre", "size", "blur", "speckle")

# Flawless renders: centred within this jitter (px) and of this half-extent (px).
CENTRE = RESOLUTION / 2
CENTRE_JITTER = 1.0
SIZE = 8.0
SIZE_JITTER = 0.75

WORDS = ("a", "on", "background", *COLOURS, *BACKGROUNDS, *SHAPES)


def make_prompt(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a grammar prompt; ValueError naming the prompt otherwise."""
    words = prompt.strip().lower().split()
    if (len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background"
            or words[1] not in COLOURS or words[2] not in SHAPES or words[5] not in BACKGROUNDS):
        raise ValueError(f"not a toy-world prompt: {prompt!r} (expected 'a <colour> <shape> on a "
                         f"<background> background' with colour in {list(COLOURS)}, shape in "
                         f"{list(SHAPES)}, background in {list(BACKGROUNDS)})")
    return words[1], words[2], words[5]


def all_prompts() -> list[str]:
    return [make_prompt(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def _split_of(colour: str, shape: str, background: str) -> str:
    # Every colour, shape and background occurs in each of eval and validation (6 prompts each).
    k = (list(COLOURS).index(colour) + 2 * SHAPES.index(shape) + list(BACKGROUNDS).index(background)) % 6
    return "eval" if k == 0 else "validation" if k == 1 else "train"


PROMPT_SPLITS: dict[str, list[str]] = {"train": [], "validation": [], "eval": []}
for _p in all_prompts():
    PROMPT_SPLITS[_split_of(*parse_prompt(_p))].append(_p)


def prompts(split: str = "all") -> list[str]:
    """Prompts of a split: "train", "validation", "eval" or "all"."""
    if split == "all":
        return all_prompts()
    if split not in PROMPT_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected all, {', '.join(PROMPT_SPLITS)}")
    return list(PROMPT_SPLITS[split])


@dataclass(frozen=True)
class RenderSpec:
    """Everything that fixes a render. Sizes and positions are in output pixels."""

    colour: str
    shape: str
    background: str
    cx: float = CENTRE
    cy: float = CENTRE
    size: float = SIZE  # half-extent: circle radius, half the square side, triangle circumradius-ish
    blur: float = 0.0  # Gaussian radius in px
    speckle: float = 0.0  # fraction of pixels replaced by salt-and-pepper noise
    noise_seed: int = 0


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    # Upward triangle whose bounding box is 2r x 2r, centred on (cx, cy).
    return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]


def render(spec: RenderSpec) -> Image.Image:
    """Draw `spec` as a 32x32 RGB image."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (RESOLUTION * s, RESOLUTION * s), BACKGROUNDS.get(spec.background)
                    or COLOURS[spec.background])
    draw = ImageDraw.Draw(big)
    cx, cy, r = spec.cx * s, spec.cy * s, spec.size * s
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(spec.shape, cx, cy, r), fill=fill)
    img = big.resize((RESOLUTION, RESOLUTION), Image.BOX)
    if spec.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(spec.blur))
    if spec.speckle > 0:
        rng = np.random.default_rng(spec.noise_seed)
        arr = np.asarray(img).copy()
        hit = rng.random(arr.shape[:2]) < spec.speckle
        arr[hit] = np.where(rng.random((int(hit.sum()), 1)) < 0.5, 0, 255)
        img = Image.fromarray(arr)
    return img


def sample_spec(prompt: str, seed: int, flaws=()) -> RenderSpec:
    """A render of `prompt` with exactly the named `flaws` (subset of FLAWS), drawn from `seed`.

    Without flaws: the prompt's colour, shape and background, centred within +-1 px, half-extent
    8 +- 0.75 px, sharp, clean. Each flaw moves one property clearly outside that range.
    """
    colour, shape, background = parse_prompt(prompt)
    unknown = set(flaws) - set(FLAWS)
    if unknown:
        raise ValueError(f"unknown flaws {sorted(unknown)}; expected some of {FLAWS}")
    rng = np.random.default_rng(seed)
    # Draw every random quantity in a fixed order, used or not, so a flaw never shifts the others.
    jx, jy, js = rng.uniform(-1, 1, size=3)
    other_colour = rng.choice([c for c in COLOURS if c != colour])
    other_shape = rng.choice([s for s in SHAPES if s != shape])
    other_bg = rng.choice([b for b in BACKGROUNDS if b != background])
    angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(5.5, 8.0)
    big_or_small, size_u = rng.random(), rng.uniform(0, 1)
    blur = rng.uniform(1.0, 1.8)
    speckle = rng.uniform(0.06, 0.14)
    spec = RenderSpec(colour, shape, background, cx=CENTRE + CENTRE_JITTER * jx, cy=CENTRE + CENTRE_JITTER * jy,
                      size=SIZE + SIZE_JITTER * js, noise_seed=int(rng.integers(2**31)))
    flaws = set(flaws)
    if "colour" in flaws:
        spec = replace(spec, colour=str(other_colour))
    if "shape" in flaws:
        spec = replace(spec, shape=str(other_shape))
    if "background" in flaws:
        spec = replace(spec, background=str(other_bg))
    if "size" in flaws:
        spec = replace(spec, size=3.5 + 1.5 * size_u if big_or_small < 0.5 else 12.0 + 1.5 * size_u)
    if "offcentre" in flaws:
        margin = spec.size + 0.5  # keep the shape inside the frame
        dist = min(dist, CENTRE - margin) if CENTRE - margin > 3 else dist
        spec = replace(spec, cx=float(np.clip(CENTRE + dist * math.cos(angle), margin, RESOLUTION - margin)),
                       cy=float(np.clip(CENTRE + dist * math.sin(angle), margin, RESOLUTION - margin)))
    if "blur" in flaws:
        spec = replace(spec, blur=float(blur))
    if "speckle" in flaws:
        spec = replace(spec, speckle=float(speckle))
    return spec


def render_prompt(prompt: str, seed: int, flaws=()) -> Image.Image:
    """Deterministic render of `prompt` with the given flaws."""
    return render(sample_spec(prompt, seed, flaws))


# Per-flaw probabilities of the base model's pretraining mixture (independent draws). Colour is
# the big one, as in DESIGN.md's probe: half the images are in a random other colour.
PRETRAIN_FLAW_RATES: dict[str, float] = {
    "colour": 0.5, "shape": 0.2, "background": 0.1, "offcentre": 0.2, "size": 0.2, "blur": 0.15, "speckle": 0.15,
}


def random_flaws(rng: np.random.Generator, rates: dict[str, float] = PRETRAIN_FLAW_RATES) -> tuple[str, ...]:
    """Independently include each flaw with its rate; draws one uniform per flaw in FLAWS order."""
    u = rng.random(len(FLAWS))
    return tuple(f for f, x in zip(FLAWS, u) if x < rates.get(f, 0.0))
