"""LAION aesthetic predictor: a linear or MLP head on the L2-normalised CLIP ViT-L/14 image embedding.

Both published heads are supported: v1 (`sa_0_4_vit_l_14_linear.pth`, one Linear 768 -> 1) and v2
(`sac+logos+ava1-l14-linearMSE.pth`, Linear layers 768-1024-128-64-16-1 with dropout between
and, as published, no activation functions). Dropout is the identity at evaluation.
"""

from __future__ import annotations

import re

import torch

from .base import CLIPBackbone, Scorer
from .weights import load_state_dict

CLIP_ID = "openai/clip-vit-large-patch14"


def linear_chain(state: dict[str, torch.Tensor], source="head") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) pairs of the Linear layers in `state`, in layer order, shape-checked."""
    weights = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not weights:
        raise ValueError(f"{source}: no Linear weights in the aesthetic head file")

    def order(key):
        return [int(n) for n in re.findall(r"\d+", key)]

    layers = []
    for key in sorted(weights, key=order):
        bias_key = key[: -len("weight")] + "bias"
        w = state[key].float()
        b = state[bias_key].float() if bias_key in state else torch.zeros(w.shape[0])
        if layers and layers[-1][0].shape[0] != w.shape[1]:
            raise ValueError(f"{source}: layer {key} expects {w.shape[1]} inputs but the previous one gives "
                             f"{layers[-1][0].shape[0]}")
        layers.append((w, b))
    if layers[-1][0].shape[0] != 1:
        raise ValueError(f"{source}: the last layer must give one output, gives {layers[-1][0].shape[0]}")
    return layers


class LaionAesthetic(Scorer):
    """`path`: the head weights file; `clip_model`: the CLIP ViT-L/14 hub id or folder."""

    name = "aesthetic"

    def __init__(self, path: str | None = None, device="cpu", dtype=torch.float32, clip_model: str | None = None,
                 processor: str | None = None):
        if path is None:
            raise ValueError("the aesthetic scorer needs --scorer-path: the LAION aesthetic head file "
                             "(e.g. sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor)")
        self.layers = [(w.to(device), b.to(device)) for w, b in linear_chain(load_state_dict(path), str(path))]
        self.clip = CLIPBackbone.from_pretrained(clip_model or CLIP_ID, processor, device, dtype)
        dim = self.clip.model.config.projection_dim
        if self.layers[0][0].shape[1] != dim:
            raise ValueError(f"{path}: the head expects {self.layers[0][0].shape[1]}-d embeddings but the CLIP model "
                             f"gives {dim}-d (the head belongs to CLIP ViT-L/14: --scorer-option clip_model=...)")

    @torch.no_grad()
    def score(self, images, prompts) -> torch.Tensor:
        x = self.clip.image_embeds(images)
        for w, b in self.layers:
            x = torch.nn.functional.linear(x, w, b)
        return x[:, 0].cpu()
