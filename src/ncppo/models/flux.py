"""FLUX.1 (FluxPipeline): a DiT of double- then single-stream blocks over 2x2-packed 16-channel
latents with rotary image/text position ids, CLIP (pooled) + T5 (sequence) text, and, for
FLUX.1-dev, a guidance embedding (trained at `guidance_embedding`, 3.5 as diffusers' FLUX scripts).
Rectified flow with the resolution-dependent shift of the scheduler config; the transformer's
timestep is sigma (the pipeline divides its 1000-sigma timesteps by 1000)."""

from __future__ import annotations

import torch

from .base import Conditioning
from .flow import FlowAdapter, pooled_or_fail


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): FluxPipeline's 2x2 packing."""
    from diffusers import FluxPipeline

    n, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, n, c, h, w)


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of height x width (latent pixels)."""
    n, _, d = packed.shape
    x = packed.view(n, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, height, width)


class FluxAdapter(FlowAdapter):
    family = "flux"
    denoiser_class_name = "FluxTransformer2DModel"
    hub_tags = ("flux", "flux-diffusers")
    max_sequence_length = 512  # FluxPipeline's default
    guidance_embedding = 3.5

    @classmethod
    def base_model_version(cls, denoiser_config: dict, prediction_type: str) -> str:
        return "flux1"

    @property
    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    @classmethod
    def _load_text_components(cls, model, **kwargs):
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        rev = kwargs.get("revision")
        tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", revision=rev),
                      T5TokenizerFast.from_pretrained(model, subfolder="tokenizer_2", revision=rev)]
        encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kwargs),
                    T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2", **kwargs)]
        return encoders, tokenizers

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> Conditioning:
        """The pipeline's own `encode_prompt`: T5 states, CLIP pooled output."""
        embeds, pooled, _ = self._encode_with_pipeline(captions)
        return Conditioning(embeds, pooled)

    def denoiser_inputs(self, cond, original_sizes, crops_top_left, target_size, *, latents, dtype):
        from diffusers import FluxPipeline

        self._check_latents(latents)
        n, _, h, w = latents.shape
        device = latents.device
        guidance = None
        if self.unet.config.guidance_embeds:
            guidance = torch.full((n,), float(self.guidance_embedding), device=device, dtype=torch.float32)
        states = cond.encoder_hidden_states.to(dtype)
        return dict(encoder_hidden_states=states, pooled_projections=pooled_or_fail(cond, self.family).to(dtype),
                    txt_ids=torch.zeros(states.shape[1], 3, device=device, dtype=dtype),
                    img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, device, dtype), guidance=guidance)

    def predict(self, model, x_t, levels, inputs, process):
        h, w = x_t.shape[-2:]
        out = model(hidden_states=pack(x_t), timestep=process.model_timesteps(levels, x_t) / 1000, **inputs).sample
        return unpack(out, h, w).float()

    def _feature_function(self, inputs, blocks):
        from ..spaces.dit import flux_features

        keys = ("encoder_hidden_states", "pooled_projections", "txt_ids", "img_ids", "guidance")

        def run(network, x, timestep, every, recompute):
            return flux_features(network, pack(x), timestep / 1000, *(inputs[k] for k in keys), blocks=blocks,
                                 every=every, recompute=recompute)

        return run

    def _feature_modules(self, network, blocks):
        from ..spaces.dit import flux_modules

        return flux_modules(network, blocks)

    def _pipeline_components(self, unet) -> dict:
        encoders, tokenizers = self.text_encoders, self.tokenizers
        return dict(transformer=unet, vae=self.vae, text_encoder=encoders[0], tokenizer=tokenizers[0],
                    text_encoder_2=encoders[1], tokenizer_2=tokenizers[1])
