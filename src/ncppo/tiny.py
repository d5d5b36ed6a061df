"""Tiny but real diffusers pipelines built from configs: for tests, benchmarks and the toy world.

Nothing here downloads anything. The tokenizers are a real `CLIPTokenizer` (BPE) and a real T5
tokenizer (Unigram, the `tokenizers` model behind `T5TokenizerFast`) whose vocabularies are built
from a word list, so a pipeline saved with `save_pretrained` loads offline through the same
`from_pretrained` code path as Stable Diffusion, SD3 and FLUX.
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


def build_t5_tokenizer(words=DEFAULT_WORDS, model_max_length: int = 512):
    """A T5 (SentencePiece-Unigram) tokenizer whose vocabulary holds "▁word" for every word of
    `words`, then single letters and digits, so any lowercase prompt tokenizes. Built offline with
    the `tokenizers` library; it saves and loads as `T5TokenizerFast` (no sentencepiece needed)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ",.'-!?"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _t5_encoder(vocab_size: int, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_vae(seed: int = 0, block_out_channels=(16, 32), latent_channels: int = 4, **flow_kwargs):
    """An AutoencoderKL with len(block_out_channels) - 1 down-samplings. `flow_kwargs` (SD3/FLUX VAEs):
    shift_factor, scaling_factor, use_quant_conv, use_post_quant_conv."""
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
        **flow_kwargs,
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


# ----- flow-matching DiTs (SD3/SD3.5, FLUX.1) ---------------------------------------------------
# 16-channel VAE latents (32 px images -> 16x16 latents), hidden size 16, real text encoders.


def tiny_flow_vae(seed: int = 0, shift_factor: float = 0.0609, scaling_factor: float = 1.5305):
    """A 16-channel AutoencoderKL without quant convs, shifted and scaled like SD3's (FLUX: 0.1159, 0.3611)."""
    return tiny_vae(seed, latent_channels=16, shift_factor=shift_factor, scaling_factor=scaling_factor,
                    use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd3_transformer(seed: int = 0, num_layers: int = 4, joint_attention_dim: int = 32,
                         pooled_projection_dim: int = 32, sample_size: int = 16):
    """An SD3Transformer2DModel shaped like SD3.5-medium in miniature: MMDiT-X dual attention in the
    first block and RMS qk-norm, patch size 2, 16 latent channels, hidden size 16."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=16, pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=sample_size,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )  # fmt: skip


def tiny_flux_transformer(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2, guidance_embeds: bool = True,
                          joint_attention_dim: int = 32, pooled_projection_dim: int = 16):
    """A FluxTransformer2DModel: double- and single-stream blocks, 2x2-packed 16-channel latents (64 inputs),
    rotary axes (2, 2, 4) = head dim 8; `guidance_embeds` as FLUX.1-dev (False: schnell)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


def tiny_flow_scheduler(dynamic: bool = False):
    """FlowMatchEulerDiscreteScheduler as SD3.5's (shift 3) or, `dynamic`, FLUX.1's (resolution-dependent)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True, **_):
    """A StableDiffusion3Pipeline: two projected CLIP encoders (hidden 16 + 16, pooled 16 + 16) and, with
    `t5`, a T5 encoder (d_model 32 = joint_attention_dim); `t5=False` saves text_encoder_3=None."""
    from diffusers import StableDiffusion3Pipeline

    tokenizer = build_tokenizer()
    t5_tokenizer = build_t5_tokenizer() if t5 else None
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed),
        scheduler=tiny_flow_scheduler(),
        vae=tiny_flow_vae(seed),
        text_encoder=_text_encoder(len(tokenizer), 16, True, 16, seed),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(len(tokenizer), 16, True, 16, seed + 1),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=_t5_encoder(len(t5_tokenizer), 32, seed + 2) if t5 else None,
        tokenizer_3=t5_tokenizer,
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True, **_):
    """A FluxPipeline: CLIP (pooled 16) + T5 (d_model 32), FLUX.1-dev-like guidance embedding by default."""
    from diffusers import FluxPipeline

    tokenizer = build_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    return FluxPipeline(
        scheduler=tiny_flow_scheduler(dynamic=True),
        vae=tiny_flow_vae(seed, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=_text_encoder(len(tokenizer), 16, False, 16, seed),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(len(t5_tokenizer), 32, seed + 1),
        tokenizer_2=t5_tokenizer,
        transformer=tiny_flux_transformer(seed, guidance_embeds=guidance_embeds),
    )


def save_tiny_pipeline(path: str | Path, family: str = "sd", prediction_type: str = "epsilon", seed: int = 0,
                       **options) -> Path:
    """Build a tiny pipeline of `family` ("sd", "sdxl", "sd3", "flux") and save it to `path`; returns the
    path. `options`: sd3 `t5=False` (no T5 encoder), flux `guidance_embeds=False` (schnell-like)."""
    builders = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
    if family not in builders:
        raise ValueError(f"family must be one of {sorted(builders)}, got {family!r}")
    path = Path(path)
    kwargs = dict(seed=seed, **options) if family in ("sd3", "flux") else dict(prediction_type=prediction_type, seed=seed)
    builders[family](**kwargs).save_pretrained(path)
    return path
