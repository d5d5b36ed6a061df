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


def lora_file(peft_state: dict[str, torch.Tensor], component: str, lora_config: dict, extra_metadata: dict | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of a LoRA in diffusers' pipeline format, from its peft keys
    (`<module>.lora_A.weight`), its peft LoraConfig as a dict and ``extra_metadata`` (strings). Every key keeps
    peft's style, prefixed by ``component``: a file mixing styles makes `load_lora_weights` drop modules."""
    state = {f"{component}.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in peft_state.items()}
    config = {f"{component}.{k}": sorted(v) if isinstance(v, set) else v for k, v in lora_config.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True, default=str),
                **(extra_metadata or {})}
    return state, metadata


def write_lora_file(out: str | Path, peft_state: dict[str, torch.Tensor], component: str, lora_config: dict,
                    extra_metadata: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write `lora_file(...)` to ``out`` atomically (a temporary name, renamed when complete). The one writer of
    the diffusers LoRA file: the training output, its checkpoints and `ncppo export --format diffusers`."""
    from safetensors.torch import save_file

    state, metadata = lora_file(peft_state, component, lora_config, extra_metadata, dtype)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(out)


def diffusers_state(run, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of RUN's LoRA in diffusers' pipeline format."""
    return lora_file(run.lora, run.adapter_class.lora_component, run.lora_config(), run.provenance(), dtype)


def save_diffusers(run, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write RUN's LoRA as one diffusers-format `.safetensors` file."""
    return write_lora_file(out, run.lora, run.adapter_class.lora_component, run.lora_config(), run.provenance(), dtype)
