"""CLIP score as torchmetrics defines it: max(100 * cosine(image, prompt), 0)."""

from __future__ import annotations

import torch

from .base import CLIPBackbone, Scorer

MODEL_ID = "openai/clip-vit-large-patch14"


class CLIPScore(Scorer):
    """CLIP score with a transformers CLIP model (hub id or folder; default CLIP ViT-L/14)."""

    name = "clip"

    def __init__(self, path: str | None = None, device="cpu", dtype=torch.float32, processor: str | None = None):
        path = path or MODEL_ID
        self.clip = CLIPBackbone.from_pretrained(path, processor, device, dtype)

    def score(self, images, prompts) -> torch.Tensor:
        return (100.0 * self.clip.cosine(images, prompts).cpu()).clamp(min=0.0)
