"""Resumable checkpoints: written under a temporary name and renamed when complete.

A checkpoint folder `checkpoint-<step>` holds what `accelerator.save_state` writes (optimizer,
lr scheduler, RNG states; the model through the hooks below: only the LoRA weights for a LoRA
run) and `trainer_state.json` (step, counters, history). `trainer_state.json` is written last,
inside the temporary folder, so a folder without it is never picked up by `--resume latest`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path


PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
LORA_FILE = "lora_adapter.safetensors"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None, "latest" (None when there is none yet) or a folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


def register_lora_hooks(accelerator, unet) -> None:
    """Make `save_state`/`load_state` store only the U-Net's LoRA weights, not the frozen base."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    target = accelerator.unwrap_model(unet)

    def save_hook(models, weights, output_dir):
        for i, model in reversed(list(enumerate(models))):
            if accelerator.unwrap_model(model) is target:
                state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(target).items()}
                if accelerator.is_main_process:
                    save_file(state, os.path.join(output_dir, LORA_FILE))
                if weights:
                    weights.pop(i)

    def load_hook(models, input_dir):
        for i, model in reversed(list(enumerate(models))):
            if accelerator.unwrap_model(model) is target:
                result = set_peft_model_state_dict(target, load_file(os.path.join(input_dir, LORA_FILE)))
                if getattr(result, "unexpected_keys", None):
                    raise RuntimeError(f"{input_dir}: unexpected LoRA keys {result.unexpected_keys[:3]}")
                models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, trainer_state: dict,
                    total_limit: int | None = None) -> Path:
    """Save a resumable checkpoint atomically; prune the oldest beyond `total_limit`."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, default=float))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Restore model/optimizer/scheduler/RNG from `path`; returns its trainer state."""
    path = Path(path)
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def save_full_unet(unet, output_dir: str | Path) -> Path:
    """A full fine-tune's U-Net as a diffusers folder (`output_dir/unet`), in float32 safetensors."""
    out = Path(output_dir) / "unet"
    tmp = Path(output_dir) / ".tmp-unet"
    if tmp.exists():
        shutil.rmtree(tmp)
    unet.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

