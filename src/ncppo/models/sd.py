"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, no added conditioning."""

from __future__ import annotations

import torch

from .base import Conditioning, ModelAdapter


class SDAdapter(ModelAdapter):
    family = "sd"
    export_formats = ("diffusers", "kohya", "merged")
    hub_tags = ("stable-diffusion", "stable-diffusion-diffusers")

    @classmethod
    def base_model_version(cls, denoiser_config: dict, prediction_type: str) -> str:
        """sd_v1, or sd_v2 (OpenCLIP-H text encoder: 1024-wide cross-attention), + "_v" for v-prediction."""
        version = "sd_v2" if denoiser_config.get("cross_attention_dim") == 1024 else "sd_v1"
        return version + ("_v" if prediction_type == "v_prediction" else "")

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    @classmethod
    def _load_text_components(cls, model, **kwargs):
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", revision=kwargs.get("revision"))
        encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kwargs)
        return [encoder], [tokenizer]

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> Conditioning:
        (ids,) = self.tokenize(captions)
        encoder = self.text_encoders[0]
        return Conditioning(encoder(ids.to(encoder.device))[0])

    def _pipeline_components(self, unet) -> dict:
        return dict(vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=unet,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
