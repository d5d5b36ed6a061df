"""The diffusers LoRA file: what `pipe.load_lora_weights(path)` reads.

Keys are `<component>.<module>.lora_A.weight` / `.lora_B.weight` (component = "unet" for the
U-Net families); the safetensors metadata holds `lora_adapter_metadata`, the adapter's peft
LoraConfig as JSON with the same component prefix, so diffusers builds the adapter with the
trained rank and alpha instead of assuming alpha = rank. ncppo's provenance keys ride along.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .files import atomic_path
from .run import METADATA_KEY


def diffusers_state(run, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of RUN's LoRA in diffusers' pipeline format."""
    prefix = run.adapter_class.lora_component
    state = {f"{prefix}.{k}": v.to(dtype).contiguous() for k, v in run.lora.items()}
    config = {f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in run.lora_config().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True, default=str),
                **run.provenance()}
    return state, metadata


def save_diffusers(run, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write RUN's LoRA as one diffusers-format `.safetensors` file."""
    from safetensors.torch import save_file

    state, metadata = diffusers_state(run, dtype)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(out)
