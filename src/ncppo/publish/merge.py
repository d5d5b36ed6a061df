"""A whole pipeline with the trained weights in it: the base pipeline, the LoRA fused into its
U-Net (or a full fine-tune's U-Net in its place), saved with `save_pretrained` (safetensors).

The base pipeline is loaded whole (`DiffusionPipeline.from_pretrained`), so every component it
ships (safety checker, feature extractor, scheduler config) is kept; the run's separate `--vae`
(e.g. the fp16-fix SDXL VAE) replaces the pipeline's VAE, since that is the VAE the run trained
and validated with. Fusing happens in float32; the result is then cast to `dtype`.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import InputError, first_line
from ..models import check_pipeline_folder
from ..models.base import load_vae
from .files import atomic_path


def merged_pipeline(run):
    """The base pipeline of RUN (float32, CPU) with the trained weights merged in."""
    from diffusers import DiffusionPipeline

    c = run.config
    flag = "base model"  # the run's recorded model, or export's --model
    check_pipeline_folder(run.model, flag=flag, vae=c.get("vae"))
    with warnings.catch_warnings():  # diffusers >= 0.36 renamed torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        try:
            pipe = DiffusionPipeline.from_pretrained(run.model, revision=c.get("revision"), variant=c.get("variant"),
                                                     torch_dtype=torch.float32)
        except (OSError, ValueError) as err:  # missing/unreadable weights, unreachable hub id, broken config
            raise InputError(f"{flag} {run.model}: cannot load the pipeline ({first_line(err)})") from err
        if c.get("vae"):
            pipe.vae = load_vae(c["vae"], torch.float32, cls=type(pipe.vae))
        component = run.adapter_class.lora_component
        if run.full_unet is not None:
            denoiser = type(getattr(pipe, component)).from_pretrained(run.full_unet, torch_dtype=torch.float32)
            pipe.register_modules(**{component: denoiser})
            return pipe
    from .diffusers_format import save_diffusers

    with tempfile.TemporaryDirectory() as tmp:
        weights = save_diffusers(run, Path(tmp) / "lora.safetensors")
        pipe.load_lora_weights(str(weights), adapter_name="ncppo")
    pipe.fuse_lora(components=[component], adapter_names=["ncppo"])
    pipe.unload_lora_weights()  # drops the LoRA layers; the fused weights stay
    return pipe


def save_merged(run, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the merged pipeline to the folder `out` in `dtype`; `from_pretrained(out)` loads it."""
    pipe = merged_pipeline(run)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    with atomic_path(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out)

