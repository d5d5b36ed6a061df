"""What SD3/SD3.5 and FLUX.1 share: a flow-matching DiT (`transformer/`), a FlowMatchEulerDiscrete
scheduler, 16-channel latents, text from the pipeline's own `encode_prompt`, LoRA on the attention
projections including the joint/context ones, and NCP through the first k transformer blocks.

The adapter keeps the name `unet` for its denoiser (the loop's one name for the trained network);
`denoiser` is an alias.
"""

from __future__ import annotations

import torch

from .base import Conditioning, ModelAdapter


class FlowAdapter(ModelAdapter):
    denoiser_class_name = ""  # the diffusers transformer class
    lora_component = "transformer"
    export_formats = ("diffusers", "merged")
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    max_sequence_length = 256  # T5 tokens, as the pipeline's default
    patch_size = 2  # latent pixels per image token side
    default_timestep_sampling = "logit_normal"  # the SD3 paper's default (mean 0, std 1)

    @classmethod
    def _noise_scheduler(cls, model, revision):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)

    @property
    def prediction_type(self) -> str:
        return "flow"  # the velocity eps - x0

    def noise_process(self, sampling=None, shift: float | None = None):
        """The rectified-flow process of the scheduler config (its shift; FLUX: resolution-dependent), or
        a fixed ``shift``; levels drawn by ``sampling`` (default logit-normal, mean 0, std 1)."""
        from ..spaces.flow import FlowMatchProcess

        return FlowMatchProcess.from_scheduler(self.noise_scheduler, sampling=sampling, shift=shift,
                                               patch_size=self.patch_size)

    # ----- text ---------------------------------------------------------------------------------
    def _encode_with_pipeline(self, captions: list[str]) -> tuple:
        if getattr(self, "_text_pipeline", None) is None:
            self._text_pipeline = self.build_pipeline()
        return self._text_pipeline.encode_prompt(list(captions), device=self.device,
                                                 max_sequence_length=self.max_sequence_length, **self._encode_kwargs)

    _encode_kwargs: dict = {}

    def _check_latents(self, latents: torch.Tensor) -> None:
        h, w = latents.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            loaded = self.encoders_loaded and self._vae is not None
            factor = self.vae_scale_factor * self.patch_size if loaded else f"{self.patch_size} x the VAE's downsampling"
            raise ValueError(f"latents {h}x{w} do not split into {self.patch_size}x{self.patch_size} patches: "
                             f"--resolution must be a multiple of {factor}")

    # ----- NCP ----------------------------------------------------------------------------------
    def perception(self, network, inputs: dict, config, process, context=None):
        from ..spaces.dit import DiTPerception, check_blocks

        blocks = check_blocks(network, config.blocks)
        run = self._feature_function(inputs, blocks)
        return DiTPerception(network, process, run, self._feature_modules(network, blocks), layers=config.layers,
                             context=context)

    def _feature_function(self, inputs: dict, blocks: int):
        raise NotImplementedError

    def _feature_modules(self, network, blocks: int):
        raise NotImplementedError

    # ----- outputs ------------------------------------------------------------------------------
    def _pipeline_components(self, unet) -> dict:
        raise NotImplementedError


def pooled_or_fail(cond: Conditioning, family: str) -> torch.Tensor:
    if cond.pooled is None:
        raise ValueError(f"{family} needs pooled text embeddings; a latent cache for it must be built with "
                         "`ncppo data cache --text-embeddings` by the same model (or without text embeddings)")
    return cond.pooled
