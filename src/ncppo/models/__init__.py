"""Model families. `load_model` picks the adapter from the pipeline's model_index.json.

Loading failures a user can cause (a missing or partial model folder, a hub id that cannot be
fetched, another kind of pipeline) raise `ncppo.errors.InputError` naming the flag and the part.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError, MissingInputError, first_line
from ..hub import check_hub_id
from .base import Conditioning, ModelAdapter
from .flux import FluxAdapter
from .sd import SDAdapter
from .sd3 import SD3Adapter
from .sdxl import SDXLAdapter

FAMILIES = {"sd": SDAdapter, "sdxl": SDXLAdapter, "sd3": SD3Adapter, "flux": FluxAdapter}
# Flow-matching pipelines, by their exact model_index.json class name.
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
SUPPORTED_PIPELINES = ("StableDiffusionPipeline (SD1.x/2.x), StableDiffusionXLPipeline (SDXL), "
                       "StableDiffusion3Pipeline (SD3/SD3.5), FluxPipeline (FLUX.1)")


# File suffixes no Hub repository name ends with: a name with one is a (mistyped) local file.
LOCAL_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow", ".safetensors", ".bin", ".pt",
                  ".pth", ".ckpt", ".yaml", ".yml")


def looks_like_path(name: str) -> bool:
    """True for what cannot be a hub id ("org/name"): ./x, /x, ~/x, a/b/c, a\\b, a file name (x.txt,
    x.safetensors, ...), a name inside an existing folder (runs/x), an existing path."""
    path = Path(name).expanduser()
    return (path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or path.suffix.lower() in LOCAL_SUFFIXES or (len(path.parts) > 1 and path.parent.is_dir()))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".msgpack")


def check_pipeline_folder(model: str, *, flag: str = "--model", vae: str | None = None) -> None:
    """For a local `model`: fail early, naming the part, if it is not a complete diffusers pipeline
    folder: model_index.json, a non-empty subfolder for every component it lists, and a weights
    file in each model subfolder (one with a config.json). Hub ids pass."""
    path = Path(model).expanduser()
    if not path.exists():
        if looks_like_path(model):
            raise MissingInputError(f"{flag} {model}: no such folder")
        check_hub_id(model, f"{flag} {model}")
        return
    if not path.is_dir():
        raise InputError(f"{flag} {model}: a file; expected a diffusers pipeline folder (save_pretrained) or hub id")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise MissingInputError(f"{flag} {model}: not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{flag} {model}: model_index.json is unreadable ({err})") from None
    parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and all(v)
             and not (k == "vae" and vae)]
    for part in parts:
        folder = path / part
        if not folder.is_dir():
            raise MissingInputError(f"{flag} {model}: partial pipeline folder: {part}/ is missing")
        if not any(f.is_file() for f in folder.iterdir()):
            raise MissingInputError(f"{flag} {model}: partial pipeline folder: {part}/ is empty")
        if (folder / "config.json").is_file() and not any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()):
            raise MissingInputError(f"{flag} {model}: partial pipeline folder: {part}/ has no weights file")


def detect_family(model: str, revision: str | None = None) -> str:
    """The family of the pipeline class in model_index.json: "sd3" (StableDiffusion3Pipeline), "flux"
    (FluxPipeline), "sdxl" (a second text encoder), else "sd" (SD1.x/2.x); another class is refused."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(model, revision=revision)
    except (OSError, ValueError) as err:
        raise InputError(f"--model {model}: cannot read the pipeline's model_index.json ({first_line(err)})") from err
    name = index.get("_class_name", "")
    if name in FLOW_PIPELINES:
        return FLOW_PIPELINES[name]
    if name and (not name.startswith("StableDiffusion") or name.startswith("StableDiffusion3")):
        raise InputError(f"--model {model}: unsupported pipeline class {name!r} (supported: {SUPPORTED_PIPELINES})")
    if "text_encoder_2" in index or "XL" in name:
        return "sdxl"
    return "sd"


def load_model(model: str, *, family: str = "auto", vae: str | None = None, revision: str | None = None,
               variant: str | None = None, weight_dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", lazy_encoders: bool = False) -> ModelAdapter:
    """Load a diffusers SD1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 pipeline (hub id or local folder) as a `ModelAdapter`.

    `lazy_encoders` defers loading the VAE and text encoders to their first use (training from a
    latent cache holding text embeddings never uses them; validation images do).
    """
    model = str(model)
    check_pipeline_folder(model, vae=vae)
    if vae and not Path(vae).expanduser().exists():
        if looks_like_path(vae):
            raise MissingInputError(f"--vae {vae}: no such folder")
        check_hub_id(vae, f"--vae {vae}")
    if family == "auto":
        family = detect_family(model, revision)
    if family not in FAMILIES:
        raise InputError(f"--family must be one of {['auto', *FAMILIES]}, got {family!r}")
    try:
        return FAMILIES[family].from_pretrained(model, vae=vae, revision=revision, variant=variant,
                                                weight_dtype=weight_dtype, device=device, lazy_encoders=lazy_encoders)
    except OSError as err:  # diffusers/transformers: missing or unreadable weight files, unreachable hub ids
        raise InputError(f"--model {model}: cannot load ({first_line(err)})") from err


__all__ = ["Conditioning", "ModelAdapter", "SDAdapter", "SDXLAdapter", "SD3Adapter", "FluxAdapter", "FAMILIES",
           "detect_family", "load_model"]
