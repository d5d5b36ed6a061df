"""The toy world's tiny pretrained base: a real Stable-Diffusion-architecture pipeline.

AutoencoderKL (32x32x3 -> 8x8x4), a CLIPTextModel with the offline grammar tokenizer, a
UNet2DConditionModel (~3 M params) and a DDIM sampling scheduler, saved with `save_pretrained` so
it loads through `StableDiffusionPipeline.from_pretrained` exactly like SD1.5. It is pretrained on
a mixture of flawless and flawed renders (`world.PRETRAIN_FLAW_RATES`) so that it draws a spread of
good and bad images: the room that preference alignment has to work in.

`build_base(BuildConfig(out=...))` reproduces the shipped weights (`SHIPPED_BASE`) from scratch:
VAE phase, latent caching, then U-Net + text-encoder phase (prompt dropout for classifier-free
guidance, EMA weights saved). U-Net and VAE weights are stored in fp16 to keep the package small;
`from_pretrained` upcasts them to fp32 (the text encoder is stored in fp32).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..publish.files import follow_umask
from . import world

SHIPPED_BASE = Path(__file__).parent / "assets" / "base"
TOKENIZER_MAX_LENGTH = 12  # "a red circle on a white background" is 7 words + 2 specials


@dataclass
class BuildConfig:
    """`ncppo toy build`: pretrain the toy base pipeline from scratch."""

    out: str = field(metadata={"help": "output folder of the pipeline (save_pretrained layout)"})
    seed: int = field(default=0, metadata={"help": "seed of weights, renders and training draws"})
    pool_size: int = field(default=12000, metadata={"help": "number of pretraining renders (prompts x flaws)"})
    vae_steps: int = field(default=700, metadata={"help": "VAE training steps"})
    vae_batch_size: int = field(default=32, metadata={"help": "VAE batch size"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE learning rate"})
    unet_steps: int = field(default=2500, metadata={"help": "U-Net (+ text encoder) training steps"})
    unet_batch_size: int = field(default=64, metadata={"help": "U-Net batch size"})
    unet_lr: float = field(default=1e-3, metadata={"help": "U-Net peak learning rate (warmup + cosine)"})
    prompt_dropout: float = field(default=0.1, metadata={"help": "share of empty prompts (classifier-free guidance)"})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the saved U-Net/text-encoder weights"})
    fp16_weights: bool = field(default=True, metadata={"help": "store U-Net and VAE weights in fp16"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: leave torch's default)"})
    device: str = field(default="cpu", metadata={"help": "torch device (random draws stay on the CPU generator)"})

    def validate(self):
        for name in ("pool_size", "vae_batch_size", "unet_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


def build_components(seed: int = 0) -> dict:
    """Fresh (untrained) pipeline components: tokenizer, text encoder, VAE, U-Net, DDPM scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..tiny import build_tokenizer

    tokenizer = build_tokenizer(world.WORDS, model_max_length=TOKENIZER_MAX_LENGTH)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=world.RESOLUTION)
    unet = UNet2DConditionModel(
        sample_size=world.RESOLUTION // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=32,
        norm_num_groups=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon",
                              steps_offset=1)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)


def render_pool(size: int, seed: int, prompt_list=None, rates=world.PRETRAIN_FLAW_RATES):
    """(pixels uint8 (N,32,32,3), captions) of `size` renders with random prompts and flaws."""
    prompt_list = prompt_list or world.all_prompts()
    rng = np.random.default_rng(seed)
    pixels = np.empty((size, world.RESOLUTION, world.RESOLUTION, 3), np.uint8)
    captions = []
    for i in tqdm(range(size), desc="render pool", leave=False):
        prompt = prompt_list[int(rng.integers(len(prompt_list)))]
        flaws = world.random_flaws(rng, rates)
        pixels[i] = np.asarray(world.render_prompt(prompt, int(rng.integers(2**31)), flaws))
        captions.append(prompt)
    return pixels, captions


def to_unit(pixels_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,H,W) in [-1, 1]."""
    return torch.from_numpy(pixels_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def train_vae(vae, pixels: torch.Tensor, cfg: BuildConfig, gen: torch.Generator) -> list[float]:
    """Reconstruction (MSE) + a small KL term; returns the loss curve (every 50 steps)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, cfg.vae_steps))
    vae.train()
    curve, running = [], []
    for step in (bar := tqdm(range(cfg.vae_steps), desc="vae")):
        idx = torch.randint(len(pixels), (cfg.vae_batch_size,), generator=gen)
        x = pixels[idx.to(pixels.device)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(x.device)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(mse.item())
        if (step + 1) % 50 == 0:
            curve.append(float(np.mean(running)))
            bar.set_postfix(mse=f"{curve[-1]:.4f}")
            running = []
    vae.eval()
    return curve


@torch.no_grad()
def encode_pool(vae, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means (unscaled) of all pixels."""
    out = [vae.encode(pixels[i:i + batch_size]).latent_dist.mean
           for i in tqdm(range(0, len(pixels), batch_size), desc="encode latents", leave=False)]
    return torch.cat(out)


def train_unet(unet, text_encoder, tokenizer, scheduler, latents, captions, cfg: BuildConfig,
               gen: torch.Generator) -> tuple[list[float], dict]:
    """Epsilon-prediction pretraining of U-Net and text encoder; returns (loss curve, EMA state)."""
    prompt_list = sorted(set(captions)) + [""]
    device = latents.device
    ids = tokenizer(prompt_list, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    caption_index = torch.tensor([prompt_list.index(c) for c in captions])
    empty = len(prompt_list) - 1
    params = [*unet.parameters(), *text_encoder.parameters()]
    named = {f"unet.{k}": v for k, v in unet.named_parameters()} | {
        f"text_encoder.{k}": v for k, v in text_encoder.named_parameters()}
    ema = {k: v.detach().clone() for k, v in named.items()}
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, cfg.unet_steps))
    unet.train()
    text_encoder.train()
    curve, running = [], []
    for step in (bar := tqdm(range(cfg.unet_steps), desc="unet")):
        idx = torch.randint(len(latents), (cfg.unet_batch_size,), generator=gen)
        x0 = latents[idx.to(device)]
        which = caption_index[idx].clone()
        which[torch.rand(len(idx), generator=gen) < cfg.prompt_dropout] = empty
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        x_t = scheduler.add_noise(x0, noise, t).to(device)
        cond = text_encoder(ids[which.to(device)])[0]
        t = t.to(device)
        loss = F.mse_loss(unet(x_t, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in named.items():
                ema[k].lerp_(v.detach(), 1 - decay)
        running.append(loss.item())
        if (step + 1) % 50 == 0:
            curve.append(float(np.mean(running)))
            bar.set_postfix(loss=f"{curve[-1]:.4f}")
            running = []
    unet.eval()
    text_encoder.eval()
    return curve, ema


def assemble_pipeline(components: dict):
    """A StableDiffusionPipeline with a DDIM sampling scheduler sharing the DDPM betas."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=components["unet"], scheduler=DDIMScheduler.from_config(components["scheduler"].config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_base(cfg: BuildConfig) -> Path:
    """Pretrain the toy base from scratch and save it to `cfg.out` with a manifest.json."""
    from ..manifest import write_manifest

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    out = Path(cfg.out)
    gen = torch.Generator().manual_seed(cfg.seed)
    comps = build_components(cfg.seed)
    for name in ("vae", "unet", "text_encoder"):
        comps[name].to(cfg.device)
    timings = {}

    t = time.time()
    pixels_u8, captions = render_pool(cfg.pool_size, cfg.seed)
    pixels = to_unit(pixels_u8).to(cfg.device)
    timings["render_s"] = time.time() - t

    t = time.time()
    vae_curve = train_vae(comps["vae"], pixels, cfg, gen)
    comps["vae"].requires_grad_(False)
    raw = encode_pool(comps["vae"], pixels)
    scaling = float(1.0 / raw.std())
    comps["vae"].register_to_config(scaling_factor=scaling)
    latents = raw * scaling
    timings["vae_s"] = time.time() - t

    t = time.time()
    unet_curve, ema = train_unet(comps["unet"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"],
                                 latents, captions, cfg, gen)
    with torch.no_grad():
        for k, v in ema.items():
            module, name = k.split(".", 1)
            comps[module].get_parameter(name).copy_(v)
    timings["unet_s"] = time.time() - t

    pipe = assemble_pipeline(comps).to("cpu")
    if cfg.fp16_weights:
        pipe.unet.to(torch.float16)
        pipe.vae.to(torch.float16)
    pipe.save_pretrained(out)
    follow_umask(out)  # safetensors writes 0600
    timings["total_s"] = time.time() - t_start
    write_manifest(out / "manifest.json", command="toy build", config=cfg, kind="ncppo toy base", timings=timings,
                   threads=torch.get_num_threads(), device=cfg.device, vae_scaling_factor=scaling,
                   vae_mse_curve_every_50=vae_curve, unet_loss_curve_every_50=unet_curve,
                   flaw_rates=world.PRETRAIN_FLAW_RATES, prompts=world.all_prompts(),
                   params={n: sum(p.numel() for p in comps[n].parameters()) for n in ("unet", "vae", "text_encoder")})
    return out


def load_base(path: str | Path | None = None, device: str = "cpu"):
    """The toy base as a fp32 StableDiffusionPipeline (default: the weights shipped with ncppo)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path) if path else SHIPPED_BASE
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no toy base pipeline at {path} (model_index.json missing); "
                                f"build one with `ncppo toy build --out {path}`")
    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
