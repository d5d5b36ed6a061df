"""`TrainConfig`: every knob of `ncppo train`. Field = YAML key = `--flag`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..configs import ConfigError

OBJECTIVE_CHOICES = ("dpo", "cpo", "sft", "ipo", "hinge", "orpo")
SPACE_CHOICES = ("latent", "ncp")


def _f(default, help, **meta):
    """A dataclass field with CLI help (and optional `choices`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    model: str = field(metadata={"help": "Diffusers pipeline to fine-tune: hub id or local folder (SD1.x/2.x or SDXL)."})
    data: str = field(metadata={"help": "Pair data: datasets hub id or save_to_disk folder, parquet/arrow file or "
                                        "folder, CSV/JSONL naming image files, or a latent cache from `ncppo data cache`."})
    output_dir: str = field(metadata={"help": "Where checkpoints, logs, the final weights and manifest.json go."})
    family: str = _f("auto", "Model family; auto reads model_index.json.", choices=("auto", "sd", "sdxl"))
    vae: str | None = _f(None, "Optional separate VAE (hub id or folder), e.g. the fp16-fix SDXL VAE.")
    revision: str | None = _f(None, "Model revision (branch, tag or commit) on the hub.")
    variant: str | None = _f(None, "Weight file variant to load, e.g. fp16.")

    # --- objective -----------------------------------------------------------------------------
    objective: str = _f("dpo", "Preference objective.", choices=OBJECTIVE_CHOICES)
    space: str = _f("ncp", "Where errors are measured: latent (Diffusion-DPO) or ncp (the frozen U-Net "
                           "encoder's noise-conditioned perceptual space).", choices=SPACE_CHOICES)
    beta: float = _f(2500.0, "Preference temperature, ncppo convention: logits = beta * (d_ref - d_theta). "
                             "Official Diffusion-DPO beta_dpo=5000 equals 2500 here (see README).")
    cpo_lambda: float = _f(0.0, "CPO: weight of the winner-error (SFT) term of eq. 19; 0 drops it.")
    orpo_lambda: float = _f(0.1, "ORPO: weight of the odds-ratio term beside the winner's error.")
    timestep_mode: str = _f("t-1", "NCP: where the encoder looks: t-1 (one DDPM posterior step), uniform "
                                   "(x0-hat re-noised at a fresh t'), same (re-noised at t).",
                            choices=("t-1", "uniform", "same"))
    ncp_layers: str = _f("down", "NCP: encoder features compared: down (last down block), mid (mid block), "
                                 "multi (conv_in and every down level, equally weighted).",
                         choices=("down", "mid", "multi"))
    checkpoint_encoder: bool = _f(False, "NCP: recompute the policy's encoder pass in backward (less memory).")

    # --- parameters ----------------------------------------------------------------------------
    finetune: str = _f("lora", "lora: LoRA adapters, reference = same U-Net with adapters off; full: all U-Net "
                               "weights, reference = a separate frozen copy.", choices=("lora", "full"))
    lora_rank: int = _f(64, "LoRA rank.")
    lora_alpha: float | None = _f(None, "LoRA alpha; default equals the rank.")
    lora_targets: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0"], "U-Net modules that get LoRA adapters.")

    # --- data ----------------------------------------------------------------------------------
    split: str = _f("train", "Dataset split (datasets ids and folders).")
    image_dir: str | None = _f(None, "Image folder for CSV/JSONL pair files (default: beside the file).")
    resolution: int = _f(512, "Training resolution in pixels (square).")
    crop: str = _f("center", "Crop after resizing the shorter side.", choices=("center", "random"))
    hflip: bool = _f(False, "Random horizontal flips (per pair, both images).")
    keep_ties: bool = _f(False, "Keep label 0.5 pairs (winner chosen as image 0). Dropped and counted by default.")
    max_train_samples: int | None = _f(None, "Use only the first N pairs (after dropping ties).")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes.")

    # --- optimisation --------------------------------------------------------------------------
    max_steps: int = _f(1000, "Optimizer steps to train.")
    batch_size: int = _f(1, "Pairs per process per micro-step.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.")
    learning_rate: float = _f(1e-5, "Peak learning rate (before --scale-lr).")
    scale_lr: bool = _f(False, "Multiply the lr by batch size x accumulation x processes (the paper: 1e-8 x 2048).")
    lr_scheduler: str = _f("constant_with_warmup", "Learning-rate schedule (diffusers.optimization names).",
                           choices=("constant", "constant_with_warmup", "linear", "cosine",
                                    "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: int = _f(0, "Warmup optimizer steps.")
    optimizer: str = _f("adamw", "adamw, or adamw8bit (needs bitsandbytes and a GPU).", choices=("adamw", "adamw8bit"))
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    weight_decay: float = _f(1e-2, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables.")
    mixed_precision: str = _f("no", "Autocast precision; frozen weights are stored in it too.",
                              choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _f(False, "Recompute U-Net activations in backward (less memory, ~30% slower).")
    seed: int = _f(0, "Seed of every random draw (noise, timesteps, data order, augmentation).")
    max_nonfinite: int = _f(5, "Stop (with a checkpoint) after this many consecutive non-finite losses/gradients.")

    # --- outputs -------------------------------------------------------------------------------
    checkpoint_every: int = _f(500, "Save a resumable checkpoint every N steps; 0 disables.")
    checkpoints_total_limit: int | None = _f(3, "Keep at most this many checkpoints (oldest removed).")
    resume: str | None = _f(None, "Resume from 'latest' or a checkpoint folder.")
    log_every: int = _f(10, "Log averaged metrics every N steps.")
    report_to: str = _f("tensorboard", "Metric tracker.", choices=("tensorboard", "wandb", "none"))
    validation_prompts: list[str] = _f([], "Prompts drawn every --validation-every steps (PNG grid + TensorBoard).")
    validation_every: int = _f(0, "Draw validation images every N steps; 0 only at the end if prompts are given.")
    validation_seed: int = _f(0, "Seed of the validation images.")
    sample_steps: int = _f(25, "Inference steps for validation and eval images.")
    guidance_scale: float = _f(7.5, "Classifier-free guidance for validation and eval images.")
    eval_every: int = _f(0, "Score eval images every N steps (and at step 0); 0 disables.")
    eval_prompts: str | None = _f(None, "Prompt file (.txt one per line, .csv/.jsonl with a 'prompt'/'caption' column).")
    eval_scorer: str | None = _f(None, "Scorer for the eval hook (see `ncppo score --help`), e.g. pickscore, toy-judge.")
    eval_scorer_path: str | None = _f(None, "Local path or hub id of the eval scorer's weights.")
    eval_seeds: list[int] = _f([0], "Seeds per eval prompt.")
    log_rank_metrics: bool = _f(False, "Also write each process's own metrics (metrics_rank<i>.jsonl); for debugging.")

    def validate(self) -> None:
        """Fail before anything is loaded, naming the flag."""
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "resolution", "lora_rank",
                    "sample_steps", "log_every", "max_nonfinite")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "validation_every", "eval_every", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8, got {self.resolution}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not self.beta > 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        for name in ("cpo_lambda", "orpo_lambda"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        if self.eval_every and not (self.eval_prompts and self.eval_scorer):
            raise ConfigError("--eval-every needs --eval-prompts and --eval-scorer")
        if self.finetune == "lora" and not self.lora_targets:
            raise ConfigError("--lora-targets must name at least one module")
