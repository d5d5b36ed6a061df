"""SDXL: two CLIP text encoders (penultimate hidden states concatenated), pooled embeddings from
the second, and per-image "time ids" (original size, crop top-left, target size)."""

from __future__ import annotations

import torch

from .base import Conditioning, ModelAdapter


class SDXLAdapter(ModelAdapter):
    family = "sdxl"
    export_formats = ("diffusers", "kohya", "merged")
    hub_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")

    @classmethod
    def base_model_version(cls, denoiser_config: dict, prediction_type: str) -> str:
        return "sdxl_base_v1-0"

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    @classmethod
    def _load_text_components(cls, model, **kwargs):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        rev = kwargs.get("revision")
        tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=f, revision=rev) for f in ("tokenizer", "tokenizer_2")]
        encoders = [
            CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kwargs),
            CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", **kwargs),
        ]
        return encoders, tokenizers

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> Conditioning:
        states, pooled = [], None
        for ids, encoder in zip(self.tokenize(captions), self.text_encoders):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
        return Conditioning(torch.cat(states, dim=-1), pooled)

    def added_cond_kwargs(self, cond, original_sizes, crops_top_left, target_size):
        """Time ids per image, each from its OWN original size and crop (rows: (h, w), (top, left))."""
        n = cond.encoder_hidden_states.shape[0]
        target = torch.tensor(target_size, dtype=torch.long).expand(n, 2)
        time_ids = torch.cat([original_sizes.reshape(n, 2), crops_top_left.reshape(n, 2), target], dim=1)
        return {"text_embeds": cond.pooled, "time_ids": time_ids.to(cond.pooled.device, cond.pooled.dtype)}

    def _pipeline_components(self, unet) -> dict:
        return dict(vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                    tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=unet)
