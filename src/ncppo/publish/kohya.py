"""The kohya LoRA format (kohya-ss/sd-scripts), which A1111, ComfyUI and Forge read.

A U-Net module `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` becomes
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` with three tensors:
`.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B) and `.alpha`, a scalar; a loader
scales the product up @ down by alpha / rank. diffusers' `convert_state_dict_to_kohya` does the
renaming but writes alpha = rank, which is wrong for any run trained with another --lora-alpha
(the weights would act alpha / rank times too strong or weak); `to_kohya` writes the trained alpha.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import torch

# ss_base_model_version -> the Stability AI model-spec architecture (modelspec.architecture)
ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v1_v": "stable-diffusion-v1",
                 "sd_v2": "stable-diffusion-v2-512", "sd_v2_v": "stable-diffusion-v2-768-v",
                 "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}


def to_kohya(lora: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A peft-keyed U-Net LoRA (`<module>.lora_A.weight`, ...) as a kohya state dict with `alpha`."""
    from diffusers.utils import convert_state_dict_to_kohya

    state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora.items()})
    for key in state:
        if key.endswith(".alpha"):
            state[key] = torch.tensor(float(alpha), dtype=torch.float32)
    return state


def kohya_metadata(run, base_model_version: str) -> dict[str, str]:
    """sd-scripts' `ss_*` keys, the model-spec keys the UIs read, and ncppo's provenance."""
    c = run.config
    resolution = c.get("resolution")
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(run.rank),
        "ss_network_alpha": str(float(run.alpha)),
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version.startswith("sd_v2")),
        "ss_sd_model_name": run.model,
        "ss_output_name": run.output_dir.name,
        "ss_training_comment": f"ncppo {c.get('space', '?')}-space {c.get('objective', '?')}, "
                               f"beta {c.get('beta', '?')} (ncppo convention)",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES.get(base_model_version, base_model_version) + "/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": run.output_dir.name,
        "modelspec.date": _dt.date.today().isoformat(),
    }
    optional = {"ss_resolution": f"({resolution}, {resolution})" if resolution else None,
                "ss_learning_rate": c.get("learning_rate"), "ss_max_train_steps": run.step,
                "ss_seed": c.get("seed"), "ss_mixed_precision": c.get("mixed_precision")}
    meta.update({k: str(v) for k, v in optional.items() if v is not None})
    meta.update(run.provenance())
    return meta


def save_kohya(run, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write RUN's U-Net LoRA as a kohya `.safetensors` file (alpha stays float32)."""
    from safetensors.torch import save_file

    from .files import atomic_path

    version = run.adapter_class.base_model_version(run.denoiser_config, run.prediction_type)
    state = {k: (v if k.endswith(".alpha") else v.to(dtype)).contiguous() for k, v in to_kohya(run.lora, run.alpha).items()}
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=kohya_metadata(run, version))
    return Path(out)
