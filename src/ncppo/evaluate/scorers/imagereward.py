"""ImageReward (Xu et al. 2023) through its own package (optional extra `ncppo[imagereward]`)."""

from __future__ import annotations

import torch

from .base import Scorer, check_batch

MISSING = ("the imagereward scorer needs the optional package image-reward: "
           "pip install 'ncppo[imagereward]' (or pip install image-reward)")


class ImageRewardScorer(Scorer):
    """`path`: a checkpoint file or the package's model name (default "ImageReward-v1.0")."""

    name = "imagereward"

    def __init__(self, path: str | None = None, device="cpu", dtype=torch.float32):
        try:
            import ImageReward as reward_lib
        except ImportError as err:
            raise ImportError(f"{MISSING} ({err})") from None
        self.model = reward_lib.load(path or "ImageReward-v1.0", device=str(device))
        self.model.eval()

    @torch.no_grad()
    def score(self, images, prompts) -> torch.Tensor:
        check_batch(images, prompts)
        return torch.tensor([float(self.model.score(p, im.convert("RGB"))) for im, p in zip(images, prompts)])
