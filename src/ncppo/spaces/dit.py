"""NCP for diffusion transformers (SD3/SD3.5 MMDiT, FLUX.1): the frozen DiT up to block k.

The "encoder" of a DiT is the front of its own forward pass: the patch embedding, the time/text
conditioning (FLUX.1-dev: also the guidance embedding), then the first k transformer blocks; the
features are the IMAGE tokens after block k (N, tokens, hidden). ``*_features`` run exactly the
code of ``SD3Transformer2DModel.forward`` / ``FluxTransformer2DModel.forward`` up to there (the
tests compare them with a forward hook on block k of the full forward). k counts the joint
(SD3) or double-stream (FLUX) blocks first, then FLUX's single-stream blocks; the default is half
the joint/double-stream blocks (SD3.5-medium: 12 of 24; FLUX.1: 9 of 19).

``layers`` "down" = the image tokens after block k (default); "multi" = after each of blocks
1..k, each level's error divided by its target features' variance. ("mid" is a U-Net level.)
"""

from __future__ import annotations

import torch

from .perception import Perception, base_model

DIT_LAYERS = ("down", "multi")


def default_blocks(transformer) -> int:
    """Half the joint/double-stream blocks (at least 1)."""
    return max(1, len(base_model(transformer).transformer_blocks) // 2)


def total_blocks(transformer) -> int:
    t = base_model(transformer)
    return len(t.transformer_blocks) + len(getattr(t, "single_transformer_blocks", None) or [])


def check_blocks(transformer, blocks: int | None) -> int:
    """``blocks`` (None: the default), checked against the transformer's block count."""
    k = default_blocks(transformer) if blocks is None else int(blocks)
    n = total_blocks(transformer)
    if not 1 <= k <= n:
        raise ValueError(f"--ncp-blocks must be in [1, {n}] for this transformer ({n} blocks), got {k}")
    return k


def _run(block, recompute, *args):
    return recompute(block, *args) if recompute is not None else block(*args)


def sd3_features(transformer, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 pooled_projections: torch.Tensor, *, blocks: int, every: bool = False, recompute=None) -> list[torch.Tensor]:
    """Image tokens after joint block ``blocks`` of an SD3Transformer2DModel (``every``: after each of 1..blocks),
    as its forward computes them; ``timestep`` as the SD3 pipeline passes it (1000 sigma)."""
    t = base_model(transformer)
    dtype = t.pos_embed.proj.weight.dtype
    hidden = t.pos_embed(sample.to(dtype)).contiguous()
    temb = t.time_text_embed(timestep, pooled_projections.to(dtype))
    context = t.context_embedder(encoder_hidden_states.to(dtype))
    levels = []
    for block in t.transformer_blocks[:blocks]:
        context, hidden = _run(block, recompute, hidden, context, temb, None)
        levels.append(hidden)
    return levels if every else [hidden]


def sd3_modules(transformer, blocks: int) -> list[torch.nn.Module]:
    t = base_model(transformer)
    return [t.pos_embed, t.time_text_embed, t.context_embedder, *t.transformer_blocks[:blocks]]


def flux_features(transformer, packed: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  pooled_projections: torch.Tensor, txt_ids: torch.Tensor, img_ids: torch.Tensor,
                  guidance: torch.Tensor | None = None, *, blocks: int, every: bool = False,
                  recompute=None) -> list[torch.Tensor]:
    """Image tokens after block ``blocks`` (double-stream blocks, then single-stream ones) of a
    FluxTransformer2DModel on 2x2-packed latents, as its forward computes them; ``timestep`` (sigma)
    and ``guidance`` as FluxPipeline passes them."""
    t = base_model(transformer)
    hidden = t.x_embedder(packed.to(t.x_embedder.weight.dtype))
    timestep = timestep.to(hidden.dtype) * 1000
    if guidance is None:
        temb = t.time_text_embed(timestep, pooled_projections.to(hidden.dtype))
    else:
        temb = t.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled_projections.to(hidden.dtype))
    context = t.context_embedder(encoder_hidden_states.to(hidden.dtype))
    rotary = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    levels = []
    for block in [*t.transformer_blocks, *t.single_transformer_blocks][:blocks]:
        context, hidden = _run(block, recompute, hidden, context, temb, rotary, None)
        levels.append(hidden)
    return levels if every else [hidden]


def flux_modules(transformer, blocks: int) -> list[torch.nn.Module]:
    t = base_model(transformer)
    return [t.x_embedder, t.time_text_embed, t.context_embedder, t.pos_embed,
            *[*t.transformer_blocks, *t.single_transformer_blocks][:blocks]]


class DiTPerception(Perception):
    """The first ``blocks`` blocks of a frozen DiT as the NCP encoder. ``run(network, x, timestep, every,
    recompute)`` is the family's feature function bound to the batch's conditioning (the adapter builds
    it); inputs x are latents (N, C, h, w) of the noise ``process``, whose levels become timesteps."""

    def __init__(self, network, process, run, modules, *, layers: str = "down", context=None):
        super().__init__(network, context)
        if layers not in DIT_LAYERS:
            raise ValueError(f"NCP layers for a transformer must be one of {DIT_LAYERS} (the image tokens after "
                             f"block k, or after each block up to k), got {layers!r}")
        self.process, self.run, self.modules = process, run, list(modules)
        self.every = self.normalize_levels = layers == "multi"

    def features(self, x, levels, recompute=None):
        return self.run(self.network, x, self.process.model_timesteps(levels, x), self.every, recompute)

    def exact_modules(self):
        return self.modules
