"""LoRA helpers: run the base network of a peft-LoRA model (the reference and the NCP encoder)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def _tuner_layers(model: torch.nn.Module) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: no model can carry adapters
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, ``model`` runs without its LoRA adapters (the frozen base network).

    Works for diffusers ``PeftAdapterMixin`` models (``unet.add_adapter``) and peft ``PeftModel``s:
    it toggles every peft tuner layer, which is what ``unet.disable_adapters()`` /
    ``enable_adapters()`` do. On exit each layer gets back its previous enabled state and every
    adapter parameter its previous ``requires_grad`` (peft's toggles set requires_grad as a side
    effect). A no-op for a model without adapters; safe to nest.
    """
    layers = _tuner_layers(model)
    was_disabled = [layer.disable_adapters for layer in layers]
    requires_grad = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
