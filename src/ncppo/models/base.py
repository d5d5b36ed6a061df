"""What every model family offers the training loop, sampling and the latent cache.

A `ModelAdapter` holds the loaded components of one pipeline and hides the family differences
(SD1.x/2.x vs SDXL vs SD3/FLUX: text encoders, pooled embeddings, time ids, the denoiser and its
noise process) behind a few methods: `encode_images`, `encode_prompts`, `denoiser_inputs`,
`noise_process`, `predict`, `perception` and `build_pipeline`. The loop and `ncppo.spaces` never
ask which family they serve. This base class implements the U-Net families (DDPM process, the
U-Net's down blocks as the NCP encoder); `models.flow.FlowAdapter` the flow-matching DiTs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Conditioning:
    """Text conditioning for a batch of prompts: per-token states and (SDXL) pooled embeddings."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def repeat(self, n: int) -> "Conditioning":
        """The batch repeated n times along dim 0 (winners then losers share their prompt)."""
        pooled = None if self.pooled is None else self.pooled.repeat(n, 1)
        return Conditioning(self.encoder_hidden_states.repeat(n, 1, 1), pooled)

    def to(self, *args, **kwargs) -> "Conditioning":
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return Conditioning(self.encoder_hidden_states.to(*args, **kwargs), pooled)


class ModelAdapter:
    """The components of one diffusers text-to-image pipeline, loaded for training.

    Subclasses set `family` and `pipeline_class` and implement `encode_prompts`,
    `added_cond_kwargs`, `_load_text_components` and `_pipeline_components`.
    """

    family: str = ""
    pipeline_class = None
    denoiser_class_name = "UNet2DConditionModel"  # the diffusers class of the trained network
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections
    default_timestep_sampling = "uniform"  # how training noise levels are drawn (--timestep-sampling auto)
    guidance_embedding: float | None = None  # guidance-distilled models (FLUX.1-dev): the value trained with

    def __init__(self, model_path: str, unet, vae, text_encoders, tokenizers, noise_scheduler, sample_scheduler):
        self.model_path = model_path
        self.unet = unet
        self._vae = vae
        self._text_encoders = list(text_encoders)
        self._tokenizers = list(tokenizers)
        self.noise_scheduler = noise_scheduler  # the training scheduler (DDPM; FlowMatchEulerDiscrete for DiTs)
        self.sample_scheduler = sample_scheduler  # the pipeline's own scheduler, for sampling
        self._deferred: dict | None = None  # how to load the VAE and text side on first use

    # The VAE and the text side load on first use when `from_pretrained(..., lazy_encoders=True)`:
    # training from a latent cache that holds text embeddings never touches them.
    @property
    def vae(self):
        self.load_encoders()
        return self._vae

    @vae.setter
    def vae(self, value):
        self._vae = value

    @property
    def text_encoders(self) -> list:
        self.load_encoders()
        return self._text_encoders

    @text_encoders.setter
    def text_encoders(self, value):
        self._text_encoders = list(value)

    @property
    def tokenizers(self) -> list:
        self.load_encoders()
        return self._tokenizers

    @tokenizers.setter
    def tokenizers(self, value):
        self._tokenizers = list(value)

    @property
    def encoders_loaded(self) -> bool:
        return self._deferred is None

    def load_encoders(self) -> None:
        """Load the deferred VAE and text encoders/tokenizers (onto the U-Net's device); a no-op
        once loaded."""
        if self._deferred is None:
            return
        d, self._deferred = self._deferred, None
        from diffusers import AutoencoderKL

        dtype, common = d["weight_dtype"], dict(revision=d["revision"])
        self._vae = load_vae(d["vae"], dtype) if d["vae"] else AutoencoderKL.from_pretrained(
            d["model"], subfolder="vae", variant=d["variant"], torch_dtype=dtype, **common)
        encoders, tokenizers = self._load_text_components(d["model"], variant=d["variant"], dtype=dtype, **common)
        for module in [self._vae, *encoders]:
            module.requires_grad_(False)
            module.eval()
            module.to(device=self.unet.device)
        self._text_encoders, self._tokenizers = list(encoders), list(tokenizers)

    # ----- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, *, vae: str | None = None, revision: str | None = None,
                        variant: str | None = None, weight_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", lazy_encoders: bool = False) -> "ModelAdapter":
        """Load every component of the pipeline `model` (hub id or local folder).

        `vae` optionally names another AutoencoderKL (hub id or folder, e.g. the fp16-fix SDXL
        VAE). Frozen components are put in `weight_dtype`; nothing requires grad on return.
        `lazy_encoders` defers the VAE and the text encoders/tokenizers to their first use.
        """
        import diffusers

        common = dict(revision=revision)
        unet = getattr(diffusers, cls.denoiser_class_name).from_pretrained(
            model, subfolder=cls.lora_component, variant=variant, torch_dtype=weight_dtype, **common)
        noise_scheduler = cls._noise_scheduler(model, revision)
        sched_name = diffusers.DiffusionPipeline.load_config(model, revision=revision).get("scheduler", [None, None])[1]
        sched_cls = getattr(diffusers, sched_name or "DDIMScheduler", diffusers.DDIMScheduler)
        sample_scheduler = sched_cls.from_pretrained(model, subfolder="scheduler", **common)

        unet.requires_grad_(False)
        unet.eval()
        unet.to(device=device)
        adapter = cls(str(model), unet, None, [], [], noise_scheduler, sample_scheduler)
        adapter._deferred = dict(model=model, vae=vae, revision=revision, variant=variant, weight_dtype=weight_dtype)
        adapter._denoiser_source = dict(revision=revision, variant=variant)
        if not lazy_encoders:
            adapter.load_encoders()
        return adapter

    @classmethod
    def _noise_scheduler(cls, model, revision):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)

    @classmethod
    def _load_text_components(cls, model, **kwargs):
        raise NotImplementedError

    def load_denoiser(self, dtype: torch.dtype):
        """A separate frozen copy of the denoiser, read again from the model (a full fine-tune's reference)."""
        import diffusers

        source = getattr(self, "_denoiser_source", {})
        net = getattr(diffusers, self.denoiser_class_name).from_pretrained(
            self.model_path, subfolder=self.lora_component, torch_dtype=dtype, **source)
        return net.requires_grad_(False).eval().to(self.device)

    # ----- facts -----------------------------------------------------------------------------
    # What `ncppo export` may write for this family (ncppo.publish): "diffusers" (the LoRA file),
    # "merged" (a whole pipeline with the LoRA fused) and, for U-Nets with kohya key names, "kohya".
    export_formats: tuple[str, ...] = ("diffusers", "merged")
    lora_component: str = "unet"  # the pipeline component that carries the LoRA
    hub_tags: tuple[str, ...] = ()  # the family's model-card tags on the Hub

    @classmethod
    def base_model_version(cls, denoiser_config: dict, prediction_type: str) -> str:
        """The base model as kohya's `ss_base_model_version` names it (e.g. sd_v1, sdxl_base_v1-0)."""
        return cls.family

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def denoiser(self):
        """The trained network: the U-Net, or the transformer of a DiT family (also `unet`)."""
        return self.unet

    # ----- the data path -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents x0 of images in [-1, 1], shape (N, 3, H, W): the VAE posterior MEAN, shifted and
        scaled as the VAE config says. Deterministic, so a latent cache equals on-the-fly encoding."""
        config = self.vae.config
        latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        if getattr(config, "shift_factor", None) is not None:
            latents = latents - config.shift_factor
        return (latents * config.scaling_factor).float()

    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer, padded to the tokenizer's max length (truncating longer captions)."""
        return [
            tok(list(captions), padding="max_length", max_length=tok.model_max_length,
                truncation=True, return_tensors="pt").input_ids
            for tok in self.tokenizers
        ]

    def encode_prompts(self, captions: list[str]) -> Conditioning:
        raise NotImplementedError

    def added_cond_kwargs(self, cond: Conditioning, original_sizes: torch.Tensor, crops_top_left: torch.Tensor,
                          target_size: tuple[int, int]) -> dict | None:
        """Extra U-Net inputs (SDXL: pooled text embeds and time ids); None for SD1.x/2.x."""
        return None

    # ----- the denoiser: noise process, prediction, NCP encoder ----------------------------------
    def noise_process(self, sampling=None, shift: float | None = None):
        """The training noise process (``ncppo.spaces.process``); ``sampling`` a LevelSampling (default
        uniform for DDPM). ``shift`` is a flow-matching option: U-Net families refuse it."""
        from ..configs import ConfigError
        from ..spaces.process import DDPMProcess

        if shift is not None:
            raise ConfigError(f"--flow-shift applies to flow-matching models (SD3, FLUX), not to {self.family}")
        return DDPMProcess(self.noise_scheduler, sampling)

    def denoiser_inputs(self, cond: Conditioning, original_sizes: torch.Tensor, crops_top_left: torch.Tensor,
                        target_size: tuple[int, int], *, latents: torch.Tensor, dtype: torch.dtype) -> dict:
        """The denoiser's conditioning keywords for a batch of latents (N, C, h, w) (text states in
        ``dtype``; SDXL's added conditioning), shared by `predict` and `perception`."""
        added = self.added_cond_kwargs(cond, original_sizes, crops_top_left, target_size)
        return dict(encoder_hidden_states=cond.encoder_hidden_states.to(dtype), added_cond_kwargs=added)

    def predict(self, model, x_t: torch.Tensor, levels: torch.Tensor, inputs: dict, process) -> torch.Tensor:
        """``model``'s prediction (float32, x_t's shape) at the process's ``levels``; x_t in the model's dtype."""
        return model(x_t, process.model_timesteps(levels, x_t), **inputs).sample.float()

    def perception(self, network, inputs: dict, config, process, context=None):
        """The NCP encoder: ``network`` (frozen under ``context``) conditioned by ``inputs``; ``config`` an NCPConfig."""
        from ..spaces.ncp import UNetPerception

        return UNetPerception(network, inputs["encoder_hidden_states"], inputs["added_cond_kwargs"], config.layers,
                              context)

    # ----- outputs -----------------------------------------------------------------------------
    def _pipeline_components(self, unet) -> dict:
        raise NotImplementedError

    def build_pipeline(self, unet=None, scheduler=None):
        """A sampling pipeline sharing this adapter's modules (no reload, no copy)."""
        components = self._pipeline_components(unet if unet is not None else self.unet)
        components["scheduler"] = scheduler if scheduler is not None else self.sample_scheduler
        return self.pipeline_class(**components)

    def save_lora(self, unet, output_dir: str | Path, weight_name: str = "pytorch_lora_weights.safetensors") -> Path:
        """Save the denoiser's LoRA adapter as the diffusers file `load_lora_weights` reads whole: peft's keys
        prefixed by the component (`unet.<module>.lora_A.weight`) for every target, and `lora_adapter_metadata`
        (rank, alpha, targets), without which diffusers assumes alpha = rank. The file `ncppo export --format
        diffusers` writes (one writer), atomically."""
        from peft.utils import get_peft_model_state_dict

        from ..publish.diffusers_format import write_lora_file

        return write_lora_file(Path(output_dir) / weight_name, get_peft_model_state_dict(unet), self.lora_component,
                               unet.peft_config["default"].to_dict())


def load_vae(vae: str, dtype: torch.dtype, cls=None):
    """A VAE (``cls``, default AutoencoderKL) from a hub id or folder holding either the VAE itself or a
    pipeline with a `vae/` subfolder (the run's ``--vae``). Another repository than the model's, so
    the model's ``--revision`` (often a commit of that repository) does not apply: its default branch."""
    from diffusers import AutoencoderKL

    return (cls or AutoencoderKL).from_pretrained(vae, subfolder=vae_subfolder(vae), torch_dtype=dtype)


def vae_subfolder(vae: str) -> str | None:
    """"vae" when ``vae`` is a local pipeline folder holding a vae/ (not a VAE folder itself), else None."""
    local = Path(vae)
    return "vae" if local.is_dir() and not (local / "config.json").exists() and (local / "vae").is_dir() else None
