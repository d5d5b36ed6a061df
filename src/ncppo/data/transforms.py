"""Image transforms with PIL + numpy: resize the shorter side, crop, flip, scale to [-1, 1].

Every random choice is passed in (`crop_fraction`, `flip`), so callers own the randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Placement:
    """Where a training crop came from: SDXL time ids are built from these."""

    original_size: tuple[int, int]  # (h, w) of the image as stored
    crop_top_left: tuple[int, int]  # (top, left) in the resized (and, if flipped, mirrored) image


def resized_hw(original_hw: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side of an (h, w) image to `resolution`."""
    h, w = original_hw
    scale = resolution / min(w, h)
    return max(resolution, round(h * scale)), max(resolution, round(w * scale))


def mirrored_crop(placement: Placement, resolution: int) -> tuple[int, int]:
    """(top, left) of the same crop seen in the horizontally flipped image."""
    _, w = resized_hw(placement.original_size, resolution)
    top, left = placement.crop_top_left
    return top, w - left - resolution


def resize_shorter_side(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so that the shorter side is exactly `resolution` (bicubic, antialiased by PIL)."""
    w, h = img.size
    rh, rw = resized_hw((h, w), resolution)
    size = (rw, rh)
    if size == (w, h):
        return img
    return img.resize(size, Image.BICUBIC)


def crop_offsets(size_hw: tuple[int, int], resolution: int, crop_fraction: float | None) -> tuple[int, int]:
    """(top, left) of a square crop: centered when `crop_fraction` is None, else at that fraction
    (0..1) of the free space along each axis."""
    h, w = size_hw
    if crop_fraction is None:
        return (h - resolution) // 2, (w - resolution) // 2
    return int(round(crop_fraction * (h - resolution))), int(round(crop_fraction * (w - resolution)))


def prepare_image(img: Image.Image, resolution: int, *, crop_fraction: float | None = None,
                  flip: bool = False) -> tuple[torch.Tensor, Placement]:
    """RGB image -> float32 (3, R, R) tensor in [-1, 1] and where it was cropped from."""
    original = (img.height, img.width)
    resized = resize_shorter_side(img, resolution)
    top, left = crop_offsets((resized.height, resized.width), resolution, crop_fraction)
    arr = np.asarray(resized.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    if flip:
        arr = arr[:, ::-1]
        # the crop's left edge as seen in the mirrored image
        left = resized.width - left - resolution
    tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) / 127.5 - 1.0
    return tensor, Placement(original, (top, left))
