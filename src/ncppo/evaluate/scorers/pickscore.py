"""PickScore (Kirstain et al. 2023): a fine-tuned CLIP ViT-H/14; score = logit_scale.exp() * cosine."""

from __future__ import annotations

import torch

from .base import CLIPBackbone, Scorer, has_processor_files

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(Scorer):
    """PickScore from a hub id or local folder (`path`); tokenizer and image processor from `processor`
    (default: the model folder when it holds them, else the LAION ViT-H/14 processor)."""

    name = "pickscore"

    def __init__(self, path: str | None = None, device="cpu", dtype=torch.float32, processor: str | None = None):
        path = path or MODEL_ID
        processor = processor or (path if has_processor_files(path) else PROCESSOR_ID)
        self.clip = CLIPBackbone.from_pretrained(path, processor, device, dtype)

    def score(self, images, prompts) -> torch.Tensor:
        scale = self.clip.model.logit_scale.detach().float().exp().cpu()
        return scale * self.clip.cosine(images, prompts).cpu()
