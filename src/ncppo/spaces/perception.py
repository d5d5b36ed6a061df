"""The frozen NCP encoder as ``ncppo.spaces.ncp.perceptual_errors`` sees it, whatever the network.

A ``Perception`` holds a denoiser (U-Net or DiT), the batch's conditioning and the noise process,
and gives the features of inputs x at noise levels t'. Built by the model adapter
(``ModelAdapter.perception``) or directly: ``ncp.UNetPerception`` (conv_in -> down blocks) and
``dit.DiTPerception`` (patch embedding + conditioning -> the first k transformer blocks).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch

from ..lora import adapters_disabled

# recompute(module, *args): a block run that keeps fewer activations (``NCPConfig.checkpoint_encoder``)
Recompute = Callable[..., object]


class Perception:
    """Subclasses set ``network`` and implement ``features`` and ``exact_modules``.

    ``context``: a zero-argument callable returning the context manager under which ``network`` is
    the frozen base network; default ``adapters_disabled(network)`` (a no-op without LoRA).
    """

    normalize_levels: bool = False  # several feature levels: each error divided by its target variance

    def __init__(self, network: torch.nn.Module, context: Callable[[], AbstractContextManager] | None = None):
        self.network = network
        self.context = context

    def frozen(self) -> AbstractContextManager:
        """The context under which ``network`` is the frozen base."""
        return self.context() if self.context is not None else adapters_disabled(self.network)

    def frozen_module(self, module: torch.nn.Module) -> AbstractContextManager:
        """The context a block's recompute runs under in backward (when the adapters are on again)."""
        return self.context() if self.context is not None else adapters_disabled(module)

    def check_frozen(self) -> None:
        with self.frozen():
            trainable = [name for name, p in self.network.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the NCP encoder must be frozen, but {len(trainable)} weights require grad, "
                             f"e.g. {trainable[0]}")

    def features(self, x: torch.Tensor, levels: torch.Tensor, recompute: Recompute | None = None) -> list[torch.Tensor]:
        """Feature levels of float32 inputs x (the process's latent shape) at noise levels ``levels``."""
        raise NotImplementedError

    def exact_modules(self) -> list[torch.nn.Module]:
        """The submodules an encoder pass runs (what the "fp32" precision upcasts)."""
        raise NotImplementedError


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model inside a peft PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
