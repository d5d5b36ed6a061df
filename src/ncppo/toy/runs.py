"""One toy training run and its images, shared by `ncppo demo` and `ncppo toy study`.

A run is LoRA preference training through `ncppo.train.loop.train` at the toy resolution, with the
toy judge as the training-time eval scorer (the score-over-steps curve), then images of a prompt
set from `ncppo.evaluate.sample` scored by the judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import world


@dataclass
class RunSpec:
    """What one toy run trains: the objective, the space, beta and the rest of the recipe."""

    space: str
    beta: float
    seed: int = 0
    objective: str = "dpo"
    beta_normalize: bool = False
    timestep_mode: str = "t-1"
    ncp_layers: str = "down"
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    lora_rank: int = 8
    beta_normalize_batches: int = 8
    sample_steps: int = 20
    guidance: float = 3.0
    curve_prompts: list[str] = field(default_factory=list)  # empty: no score-over-steps curve
    curve_seeds: list[int] = field(default_factory=list)
    eval_every: int = 0


def write_prompts(path: Path, prompts: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n")
    return str(path)


def stage_label(k: int, n: int, what: str) -> str:
    """A progress-bar label naming the stage and how many there are: "[2/6] latent-DPO train"."""
    return f"[{k}/{n}] {what}"


def train_config(spec: RunSpec, *, model: str, data: str, out: Path, progress_desc: str = "train"):
    """The TrainConfig of one toy run: LoRA at 32 px, constant lr, the toy judge as eval scorer;
    `progress_desc` labels its progress bar."""
    from ..train.config import TrainConfig

    curve = bool(spec.curve_prompts and spec.eval_every)
    prompts_file = write_prompts(out.parent / f"{out.name}-curve-prompts.txt", spec.curve_prompts) if curve else None
    return TrainConfig(
        model=model, data=data, output_dir=str(out), objective=spec.objective, space=spec.space, beta=spec.beta,
        beta_normalize=spec.beta_normalize, beta_normalize_batches=spec.beta_normalize_batches,
        timestep_mode=spec.timestep_mode, ncp_layers=spec.ncp_layers,
        finetune="lora", lora_rank=spec.lora_rank, lora_alpha=float(spec.lora_rank), resolution=world.RESOLUTION,
        max_steps=spec.steps, batch_size=spec.batch_size, learning_rate=spec.lr, lr_scheduler="constant",
        checkpoint_every=0, report_to="none", log_every=max(1, spec.steps // 10), seed=spec.seed,
        sample_steps=spec.sample_steps, guidance_scale=spec.guidance, eval_every=spec.eval_every if curve else 0,
        eval_prompts=prompts_file, eval_scorer="toy-judge" if curve else None,
        eval_seeds=list(spec.curve_seeds) if curve else [0], progress_desc=progress_desc)


def image_set(prompts: list[str], seeds_per_prompt: int, first_seed: int) -> tuple[list[str], list[int]]:
    """(prompt, seed) lists, prompt-major: every prompt with seeds first_seed .. first_seed + k - 1."""
    return ([p for p in prompts for _ in range(seeds_per_prompt)],
            [first_seed + k for _ in prompts for k in range(seeds_per_prompt)])


def sample_and_score(model: str, lora: str | None, prompts: list[str], seeds: list[int], *, sample_steps: int,
                     guidance: float, progress_desc: str = "sampling") -> tuple[list, np.ndarray]:
    """Images of (prompt, seed) from the base (+ LoRA), and their judge scores."""
    import torch

    from ..evaluate.sample import load_pipeline, sample_images
    from .judge import ToyJudge

    pipe = load_pipeline(model, lora=lora, device="cuda" if torch.cuda.is_available() else "cpu")
    images = sample_images(pipe, prompts, seeds, steps=sample_steps, guidance=guidance,
                           height=world.RESOLUTION, width=world.RESOLUTION, batch_size=32, progress=True,
                           progress_desc=progress_desc)
    return images, ToyJudge().score(images, prompts).numpy()


def train_run(spec: RunSpec, *, model: str, data: str, out: Path, progress_desc: str = "train"):
    """Train one run; returns (TrainResult, the manifest's beta_normalization record or None)."""
    import json

    from ..train.loop import train

    result = train(train_config(spec, model=model, data=data, out=out, progress_desc=progress_desc))
    manifest = json.loads((out / "manifest.json").read_text())
    return result, manifest.get("beta_normalization")
