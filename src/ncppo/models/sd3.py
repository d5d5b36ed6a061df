"""SD3 / SD3.5 (StableDiffusion3Pipeline): an MMDiT over 2x2 patches of 16-channel latents, two CLIP
text encoders (penultimate states + pooled projections) and an optional T5 (a folder saved with
`text_encoder_3=None` conditions on zeros in its place, as the pipeline does). Rectified flow with
the scheduler's shift (SD3.5: 3.0); the denoiser's timestep is 1000 sigma."""

from __future__ import annotations

import torch

from .base import Conditioning
from .flow import FlowAdapter, pooled_or_fail


def listed(index: dict, component: str) -> bool:
    """True if model_index.json names a class for `component` (not [null, null] / absent)."""
    value = index.get(component)
    return isinstance(value, (list, tuple)) and all(value)


class SD3Adapter(FlowAdapter):
    family = "sd3"
    denoiser_class_name = "SD3Transformer2DModel"
    hub_tags = ("sd3", "sd3-diffusers", "stable-diffusion-3")
    max_sequence_length = 256  # StableDiffusion3Pipeline's default
    _encode_kwargs = {"prompt_2": None, "prompt_3": None, "do_classifier_free_guidance": False}

    @classmethod
    def base_model_version(cls, denoiser_config: dict, prediction_type: str) -> str:
        return "sd3"

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    @classmethod
    def _load_text_components(cls, model, **kwargs):
        from diffusers import DiffusionPipeline
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        rev = kwargs.get("revision")
        tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=f, revision=rev) for f in ("tokenizer", "tokenizer_2")]
        encoders = [CLIPTextModelWithProjection.from_pretrained(model, subfolder=f, **kwargs)
                    for f in ("text_encoder", "text_encoder_2")]
        if listed(DiffusionPipeline.load_config(model, revision=rev), "text_encoder_3"):
            tokenizers.append(T5TokenizerFast.from_pretrained(model, subfolder="tokenizer_3", revision=rev))
            encoders.append(T5EncoderModel.from_pretrained(model, subfolder="text_encoder_3", **kwargs))
        return encoders, tokenizers

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> Conditioning:
        """The pipeline's own `encode_prompt`: CLIP-L/G penultimate states (padded to T5's width) then T5
        states (zeros without T5) along the sequence; pooled = CLIP-L + CLIP-G projections."""
        embeds, _, pooled, _ = self._encode_with_pipeline(captions)
        return Conditioning(embeds, pooled)

    def denoiser_inputs(self, cond, original_sizes, crops_top_left, target_size, *, latents, dtype):
        self._check_latents(latents)
        return dict(encoder_hidden_states=cond.encoder_hidden_states.to(dtype),
                    pooled_projections=pooled_or_fail(cond, self.family).to(dtype))

    def predict(self, model, x_t, levels, inputs, process):
        return model(hidden_states=x_t, timestep=process.model_timesteps(levels, x_t), **inputs).sample.float()

    def _feature_function(self, inputs, blocks):
        from ..spaces.dit import sd3_features

        def run(network, x, timestep, every, recompute):
            return sd3_features(network, x, timestep, inputs["encoder_hidden_states"], inputs["pooled_projections"],
                                blocks=blocks, every=every, recompute=recompute)

        return run

    def _feature_modules(self, network, blocks):
        from ..spaces.dit import sd3_modules

        return sd3_modules(network, blocks)

    def _pipeline_components(self, unet) -> dict:
        encoders, tokenizers = self.text_encoders, self.tokenizers
        t5 = len(encoders) > 2
        return dict(transformer=unet, vae=self.vae, text_encoder=encoders[0], tokenizer=tokenizers[0],
                    text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
                    text_encoder_3=encoders[2] if t5 else None, tokenizer_3=tokenizers[2] if t5 else None)
