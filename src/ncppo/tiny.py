"""Tiny but real diffusers pipelines built from configs: for tests, benchmarks and the toy world.

Nothing here downloads anything. The tokenizer is a real `CLIPTokenizer` whose vocabulary is built
from a word list, so a pipeline saved with `save_pretrained` loads offline through the same
`from_pretrained` code path as Stable Diffusion.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

DEFAULT_WORDS = (
    "a an the of on in with and photo painting drawing cat dog tree house car red green blue "
    "yellow white black small big circle square triangle background picture"
).split()


def build_tokenizer(words=DEFAULT_WORDS, model_max_length: int = 16):
    """A CLIP BPE tokenizer whose vocabulary holds every word of `words` as one token.

    Unknown words fall back to single letters, so any lowercase prompt tokenizes.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = sorted(set(string.ascii_lowercase + string.digits + ",.'-!?") | set("".join(words)))
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: w, o, r, d</w> -> wo -> wor -> word</w>
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _text_encoder(vocab_size: int, hidden: int, with_projection: bool, projection_dim: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_vae(seed: int = 0, block_out_channels=(16, 32), latent_channels: int = 4):
    """An AutoencoderKL with len(block_out_channels) - 1 down-samplings."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32, sdxl: bool = False, block_out_channels=(32, 64)):
    """A UNet2DConditionModel with one cross-attention down level and one plain one.

    sdxl=True adds the "text_time" additional embedding (pooled text embeds + 6 time ids).
    """
    from diffusers import UNet2DConditionModel

    kwargs = {}
    if sdxl:
        time_dim = 8
        kwargs = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=16 + 6 * time_dim,  # pooled (projection_dim 16) + time ids
            transformer_layers_per_block=(1, 1),
        )
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **kwargs,
    )


def tiny_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )


def tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A StableDiffusionPipeline (SD1.x/2.x architecture) with ~100k-parameter components."""
    from diffusers import StableDiffusionPipeline

    tokenizer = build_tokenizer()
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=_text_encoder(len(tokenizer), 32, False, 32, seed),
        tokenizer=tokenizer,
        unet=tiny_unet(seed, cross_attention_dim=32),
        scheduler=tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A StableDiffusionXLPipeline: two text encoders (hidden 16 + 16 = cross-attention 32),
    pooled embeddings from the second, and "text_time" added conditioning."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer = build_tokenizer()
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=_text_encoder(len(tokenizer), 16, False, 16, seed),
        text_encoder_2=_text_encoder(len(tokenizer), 16, True, 16, seed + 1),
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=tiny_unet(seed, cross_attention_dim=32, sdxl=True),
        scheduler=tiny_scheduler(prediction_type),
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_pipeline(path: str | Path, family: str = "sd", prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build a tiny pipeline of `family` ("sd" or "sdxl") and save it to `path`; returns the path."""
    builders = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline}
    if family not in builders:
        raise ValueError(f"family must be one of {sorted(builders)}, got {family!r}")
    path = Path(path)
    builders[family](prediction_type=prediction_type, seed=seed).save_pretrained(path)
    return path
