"""`ncppo export`: a run's weights as a kohya file, a diffusers LoRA file or a merged pipeline,
and its model card. Each family's adapter lists the formats it supports (`export_formats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configs import ConfigError, option
from ..errors import InputError, OutputExistsError
from .card import check_card_target, write_model_card
from .diffusers_format import save_diffusers
from .kohya import save_kohya
from .merge import save_merged
from .run import TrainedRun, load_run

EXPORTERS = {"kohya": save_kohya, "diffusers": save_diffusers, "merged": save_merged}
FILE_FORMATS = ("kohya", "diffusers")  # one .safetensors file; "merged" is a folder
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportConfig:
    run: str = field(metadata={"help": "training output folder, or one of its checkpoint-<step> folders", "cli": False})
    format: str | None = option(None, "kohya: one .safetensors file with lora_unet_* keys and the trained alpha "
                                      "(A1111, ComfyUI, Forge); diffusers: the LoRA file for load_lora_weights, with "
                                      "lora_adapter_metadata; merged: the whole base pipeline with the weights fused "
                                      "in, saved with save_pretrained", choices=tuple(EXPORTERS))
    out: str | None = option(None, "the .safetensors file (kohya, diffusers) or folder (merged) to write; with "
                                   "only --card, the folder for README.md; none = RUN")
    dtype: str = option("fp32", "precision of the written weights (fusing is done in fp32)", choices=tuple(DTYPES))
    card: bool = option(False, "write a Hub model card, README.md, beside the export (in --out for merged), or "
                               "into RUN without --format")
    eval: list[str] = option([], "`ncppo compare --out` folders (or compare.json files), comma-separated, whose tables "
                                    "go into the card")
    model: str | None = option(None, "base pipeline (hub id or folder); none = the one RUN's manifest.json names")
    lora_alpha: float | None = option(None, "LoRA alpha; none = from the weights' metadata or the manifest (give it "
                                            "for a checkpoint of a run that wrote no manifest)")
    license: str | None = option(None, "the card's license; none = the base model card's, else 'other'")
    overwrite: bool = option(False, "replace an existing --out")

    def validate(self) -> None:
        if not self.format and not self.card:
            raise ConfigError("nothing to do: give --format kohya|diffusers|merged and/or --card")
        if self.format and not self.out:
            raise ConfigError(f"--format {self.format} needs --out")
        if self.format in FILE_FORMATS and not str(self.out).endswith(".safetensors"):
            raise ConfigError(f"--out {self.out}: --format {self.format} writes one file, name it *.safetensors")
        if self.eval and not self.card:
            raise ConfigError("--eval goes into the model card: add --card")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be > 0, got {self.lora_alpha}")


def check_format(run: TrainedRun, fmt: str) -> None:
    """Refuse, in one line, a format the run's family or kind of weights cannot give."""
    formats = run.adapter_class.export_formats
    if fmt not in formats:
        raise InputError(f"--format {fmt}: not available for the {run.family} family (it exports {', '.join(formats)})")
    if fmt in FILE_FORMATS and run.lora is None:
        raise InputError(f"--format {fmt}: {run.path} is a full fine-tune (no LoRA); use --format merged")


def run_export(config: ExportConfig) -> list[Path]:
    """Export and/or write the card; returns the paths written."""
    run = load_run(config.run, model=config.model, lora_alpha=config.lora_alpha)
    card = _card_target(run, config) if config.card else None  # refused before any work, if it must be
    written = []
    if config.format:
        check_format(run, config.format)
        out = Path(config.out)
        if out.exists() and not config.overwrite:
            raise OutputExistsError(f"--out {out} exists; pass --overwrite to replace it")
        written.append(EXPORTERS[config.format](run, out, DTYPES[config.dtype]))
    if card:
        written.append(write_model_card(run, card["dir"], kind=card["kind"], weights_name=card.get("weights_name"),
                                        license=config.license, eval_paths=config.eval))
    return written


def _card_target(run: TrainedRun, config: ExportConfig) -> dict:
    """Where the card goes and what it describes; refuses a README.md that ncppo did not write."""
    if config.format == "merged":
        target = dict(dir=Path(config.out), kind="merged")
    elif config.format:
        out = Path(config.out)
        target = dict(dir=out.parent, kind="kohya" if config.format == "kohya" else "lora", weights_name=out.name)
    elif run.checkpoint and not config.out:
        raise InputError(f"RUN {run.path} is a checkpoint: its card goes with an export (add --format) or into --out")
    else:
        target = dict(dir=Path(config.out or run.output_dir), kind="lora" if run.lora is not None else "full")
    check_card_target(target["dir"])
    return target
