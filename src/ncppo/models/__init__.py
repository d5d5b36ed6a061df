"""Model families. `load_model` picks the adapter from the pipeline's model_index.json."""

from __future__ import annotations

import torch

from .base import Conditioning, ModelAdapter
from .sd import SDAdapter
from .sdxl import SDXLAdapter

FAMILIES = {"sd": SDAdapter, "sdxl": SDXLAdapter}


def detect_family(model: str, revision: str | None = None) -> str:
    """"sdxl" if the pipeline has a second text encoder, else "sd" (SD1.x/2.x)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model, revision=revision)
    name = index.get("_class_name", "")
    if "text_encoder_2" in index or "XL" in name:
        return "sdxl"
    if name and not name.startswith("StableDiffusion"):
        raise ValueError(f"--model {model}: unsupported pipeline class {name!r} (expected SD1.x/2.x or SDXL)")
    return "sd"


def load_model(model: str, *, family: str = "auto", vae: str | None = None, revision: str | None = None,
               variant: str | None = None, weight_dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> ModelAdapter:
    """Load a diffusers SD1.x/2.x or SDXL pipeline (hub id or local folder) as a `ModelAdapter`."""
    if family == "auto":
        family = detect_family(model, revision)
    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {['auto', *FAMILIES]}, got {family!r}")
    return FAMILIES[family].from_pretrained(model, vae=vae, revision=revision, variant=variant,
                                            weight_dtype=weight_dtype, device=device)


__all__ = ["Conditioning", "ModelAdapter", "SDAdapter", "SDXLAdapter", "FAMILIES", "detect_family", "load_model"]
