"""`TrainConfig`: every knob of `ncppo train`. Field = YAML key = `--flag`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..configs import ConfigError, option

OBJECTIVE_CHOICES = ("dpo", "cpo", "sft", "ipo", "hinge", "orpo")
SPACE_CHOICES = ("latent", "ncp")




@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    model: str = field(metadata={"help": "Diffusers pipeline to fine-tune: hub id or local folder (SD1.x/2.x, SDXL, "
                                         "SD3/SD3.5 or FLUX.1)."})
    data: str = field(metadata={"help": "Pair data: datasets hub id or save_to_disk folder, parquet/arrow file or "
                                        "folder, CSV/JSONL naming image files, or a latent cache from `ncppo data cache`."})
    output_dir: str = field(metadata={"help": "Where checkpoints, logs, the final weights and manifest.json go."})
    family: str = option("auto", "Model family; auto reads model_index.json.", choices=("auto", "sd", "sdxl", "sd3", "flux"))
    vae: str | None = option(None, "Optional separate VAE (hub id or folder), e.g. the fp16-fix SDXL VAE (its "
                                   "default branch: --revision applies to --model only).")
    revision: str | None = option(None, "Revision (branch, tag or commit) of --model on the hub.")
    variant: str | None = option(None, "Weight file variant to load, e.g. fp16.")

    # --- objective -----------------------------------------------------------------------------
    objective: str = option("dpo", "Preference objective.", choices=OBJECTIVE_CHOICES)
    space: str = option("ncp", "Where errors are measured: latent (Diffusion-DPO) or ncp (the frozen U-Net "
                           "encoder's noise-conditioned perceptual space).", choices=SPACE_CHOICES)
    beta: float = option(2500.0, "Preference temperature, ncppo convention: logits = beta * (d_ref - d_theta). "
                             "Official Diffusion-DPO beta_dpo=5000 equals 2500 here (see README).")
    beta_normalize: bool = option(False, "Divide --beta by the mean reference error measured on the first "
                                         "--beta-normalize-batches micro-batches, then frozen (kept in checkpoints, logged in "
                                         "the manifest), so one --beta means the same in latent and NCP space; see docs/study.md.")
    beta_normalize_batches: int = option(8, "Micro-steps (each all processes together) whose errors set the --beta-normalize scale.")
    cpo_lambda: float = option(0.0, "CPO: weight of the winner-error (SFT) term of eq. 19; 0 drops it.")
    orpo_lambda: float = option(0.1, "ORPO: weight of the odds-ratio term beside the winner's error.")
    label_smoothing: float = option(0.0, "Label smoothing eps in [0, 0.5): the probability p that a pair's winner is "
                                         "preferred (1 for hard labels, max(label_0, 1 - label_0) for soft ones) "
                                         "becomes p (1 - eps) + (1 - p) eps, so hard labels train toward 1 - eps "
                                         "(conservative DPO; every objective's pairwise term, see docs/library.md).")
    timestep_mode: str = option("t-1", "NCP: where the encoder looks: t-1 (one DDPM posterior step), uniform "
                                   "(x0-hat re-noised at a fresh t'), same (re-noised at t).",
                            choices=("t-1", "uniform", "same"))
    ncp_layers: str = option("down", "NCP: encoder features compared: down (last down block), mid (mid block), "
                                 "multi (conv_in and every down level, equally weighted). SD3/FLUX: down = the "
                                 "image tokens after block --ncp-blocks, multi = after each block up to it.",
                         choices=("down", "mid", "multi"))
    checkpoint_encoder: bool = option(False, "NCP: recompute the policy's encoder pass in backward (less memory).")
    ncp_precision: str = option("auto", "NCP: how the nearly equal encoder inputs are compared. scaled: each input "
                                   "difference magnified to rms --ncp-scale-rms, error divided back (correct in bf16/fp16/TF32, "
                                   "~2%% off exact, same cost); fp32: exact fp32 encoder passes (~7x slower on a GPU); native: "
                                   "as computed (exact only in full fp32, rounding noise in bf16); auto: native where exact "
                                   "(fp32 weights, no autocast, CPU or TF32 off), else scaled.",
                                choices=("auto", "scaled", "fp32", "native"))
    ncp_scale_rms: float = option(0.1, "NCP: rms the input difference is magnified to by --ncp-precision scaled.")
    ncp_blocks: int | None = option(None, "NCP for SD3/FLUX: transformer blocks the frozen encoder runs (joint/double-"
                                          "stream blocks first, then FLUX's single-stream ones); the features are the image "
                                          "tokens after the last. Default: half the joint/double-stream blocks.")
    timestep_sampling: str = option("auto", "How training noise levels are drawn: uniform, logit_normal (SD3 paper: "
                                            "sigmoid of N(--logit-mean, --logit-std)), mode (SD3 paper, --mode-scale); auto = "
                                            "uniform for SD1.x/2.x/SDXL, logit_normal (mean 0, std 1) for SD3/FLUX.",
                                    choices=("auto", "uniform", "logit_normal", "mode"))
    logit_mean: float = option(0.0, "--timestep-sampling logit_normal: mean.")
    logit_std: float = option(1.0, "--timestep-sampling logit_normal: standard deviation.")
    mode_scale: float = option(1.29, "--timestep-sampling mode: scale.")
    flow_shift: float | None = option(None, "SD3/FLUX: a fixed sigma shift s, sigma = s u / (1 + (s - 1) u); default the "
                                            "scheduler config's (SD3.5: 3.0; FLUX: resolution-dependent); 1 = no shift.")
    guidance_embedding: float = option(3.5, "FLUX.1-dev: the value its guidance embedding gets while training (as "
                                            "diffusers' FLUX scripts); models without one ignore it.")

    # --- parameters ----------------------------------------------------------------------------
    finetune: str = option("lora", "lora: LoRA adapters, reference = same U-Net with adapters off; full: all U-Net "
                               "weights, reference = a separate frozen copy.", choices=("lora", "full"))
    lora_rank: int = option(64, "LoRA rank.")
    lora_alpha: float | None = option(None, "LoRA alpha; default equals the rank.")
    lora_targets: list[str] | None = option(None, "Denoiser modules that get LoRA adapters; default the attention "
                                                  "projections: to_q, to_k, to_v, to_out.0 (U-Nets), plus the joint/context "
                                                  "add_q_proj, add_k_proj, add_v_proj, to_add_out (SD3, FLUX).")
    init_lora: str | None = option(None, "LoRA file or run folder to start from instead of a fresh adapter (continue a "
                                         "LoRA: on-policy rounds); its rank and alpha must be --lora-rank/--lora-alpha.")
    reference_lora: str | None = option(None, "DPO reference = the base with this LoRA (frozen) instead of the bare base "
                                              "(iterative DPO's previous policy). The NCP encoder stays the bare base.")

    # --- data ----------------------------------------------------------------------------------
    split: str = option("train", "Dataset split (datasets ids and folders).")
    image_dir: str | None = option(None, "Image folder for CSV/JSONL pair files (default: beside the file).")
    resolution: int | None = option(None, "Training resolution in pixels (square); default 512, or the latent "
                                          "cache's own (--data from `ncppo data cache`).")
    crop: str = option("center", "Crop after resizing the shorter side.", choices=("center", "random"))
    hflip: bool = option(False, "Random horizontal flips (per pair, both images).")
    keep_ties: bool = option(False, "Keep label 0.5 pairs (trained as a win of image 0). Dropped and counted by default.")
    max_train_samples: int | None = option(None, "Use only the first N pairs (after dropping ties).")
    dataloader_num_workers: int = option(0, "DataLoader worker processes.")

    # --- optimisation --------------------------------------------------------------------------
    max_steps: int = option(1000, "Optimizer steps to train.")
    batch_size: int = option(1, "Pairs per process per micro-step.")
    gradient_accumulation_steps: int = option(1, "Micro-steps per optimizer step.")
    learning_rate: float = option(1e-5, "Peak learning rate (before --scale-lr).")
    scale_lr: bool = option(False, "Multiply the lr by batch size x accumulation x processes (the paper: 1e-8 x 2048).")
    lr_scheduler: str = option("constant_with_warmup", "Learning-rate schedule (diffusers.optimization names).",
                           choices=("constant", "constant_with_warmup", "linear", "cosine",
                                    "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: int = option(0, "Warmup optimizer steps.")
    optimizer: str = option("adamw", "adamw, or adamw8bit (needs bitsandbytes and a GPU).", choices=("adamw", "adamw8bit"))
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    weight_decay: float = option(1e-2, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm; 0 disables.")
    mixed_precision: str = option("no", "Autocast precision; frozen weights are stored in it too.",
                              choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False, "Recompute U-Net activations in backward (less memory, ~30% slower).")
    compile: bool = option(False, "torch.compile the denoiser's repeated blocks in place (regional compilation: the "
                                  "U-Net's transformer blocks, the DiT's blocks; the NCP encoder pass and the reference "
                                  "use them too). Compiles at the first step. Policy and reference become different "
                                  "graphs: at LoRA init their errors agree to rounding, not bit for bit.")
    compile_backend: str = option("inductor", "torch.compile backend for --compile (inductor; aot_eager checks the "
                                              "tracing without code generation).")
    compile_mode: str = option("default", "torch.compile mode for --compile.",
                               choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    channels_last: bool = option(False, "Store the denoiser's convolution weights channels-last (faster bf16/fp16 "
                                        "convolutions on NVIDIA GPUs; values unchanged).")
    seed: int = option(0, "Seed of every random draw (noise, timesteps, data order, augmentation).")
    max_nonfinite: int = option(5, "Stop (with a checkpoint) after this many consecutive non-finite losses/gradients "
                                   "(with fp16, overflowing gradients are the GradScaler's to skip and do not count).")

    # --- outputs -------------------------------------------------------------------------------
    checkpoint_every: int = option(500, "Save a resumable checkpoint every N steps; 0 disables.")
    checkpoints_total_limit: int | None = option(3, "Keep at most this many checkpoints (oldest removed).")
    resume: str | None = option(None, "Resume from 'latest' (the newest intact checkpoint in --output-dir; none yet: "
                                  "start at step 0) or a checkpoint folder.")
    resume_anyway: bool = option(False, "Resume even if the checkpoint's batch size, accumulation, process count, "
                                        "data fingerprint, model, LoRA shape or seed differ from this run's (named in the error).")
    log_every: int = option(10, "Log averaged metrics every N steps.")
    report_to: str = option("tensorboard", "Metric tracker.", choices=("tensorboard", "wandb", "none"))
    validation_prompts: list[str] = option([], "Prompts drawn every --validation-every steps (PNG grid + TensorBoard); the flag "
                                       "splits at commas, a YAML list keeps them.")
    validation_every: int = option(0, "Draw validation images every N steps; 0 only at the end if prompts are given.")
    validation_seed: int = option(0, "Seed of the validation images.")
    sample_steps: int = option(25, "Inference steps for validation and eval images.")
    guidance_scale: float = option(7.5, "Classifier-free guidance for validation and eval images.")
    eval_every: int = option(0, "Score eval images every N steps (and at step 0); 0 disables.")
    eval_prompts: str | None = option(None, "Prompt file (.txt one per line, .csv/.jsonl with a 'prompt'/'caption' column).")
    eval_scorer: str | None = option(None, "Scorer for the eval hook (see `ncppo score --help`), e.g. pickscore, toy-judge.")
    eval_scorer_path: str | None = option(None, "Local path or hub id of the eval scorer's weights.")
    eval_seeds: list[int] = option([0], "Seeds per eval prompt.")
    gold_scorer: str | None = option(None, "Gold scorer: a reward model that did NOT label the training pairs (or "
                                           "module:callable), scored on the held-out --eval-prompts every --gold-every "
                                           "steps beside --eval-scorer (the proxy), against reward hacking. The best "
                                           "step's weights are kept in best/.")
    gold_scorer_path: str | None = option(None, "Local path or hub id of the gold scorer's weights.")
    gold_every: int = option(0, "Evaluate the gold scorer every N steps (and at step 0); 0 = every --eval-every steps.")
    stop_on_gold_drop: float | None = option(None, "Stop once the gold score falls this much below its best; the "
                                                   "result (the run's weights, best/) is then the best step's. none: never.")
    log_rank_metrics: bool = option(False, "Also write each process's own metrics (metrics_rank<i>.jsonl); for debugging.")
    progress_desc: str = option("train", "Label of the progress bar (callers such as `ncppo demo` name the stage); "
                                         "not a flag.", cli=False)

    def validate(self) -> None:
        """Fail before anything is loaded, naming the flag."""
        for f in fields(self):  # nan/inf pass every comparison below, so reject them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "resolution", "lora_rank",
                    "sample_steps", "log_every", "max_nonfinite", "beta_normalize_batches")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "validation_every", "eval_every", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.resolution is not None and self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8, got {self.resolution}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not self.ncp_scale_rms > 0:
            raise ConfigError(f"--ncp-scale-rms must be > 0, got {self.ncp_scale_rms}")
        if not self.beta > 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        for name in ("cpo_lambda", "orpo_lambda"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for name in ("max_grad_norm", "adam_epsilon", "weight_decay", "guidance_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"--max-train-samples must be >= 1, got {self.max_train_samples}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"--checkpoints-total-limit must be >= 1 (or none), got {self.checkpoints_total_limit}")
        if self.eval_every and not (self.eval_prompts and (self.eval_scorer or self.gold_scorer)):
            raise ConfigError("--eval-every needs --eval-prompts and --eval-scorer (or --gold-scorer)")
        if self.gold_every < 0:
            raise ConfigError(f"--gold-every must be >= 0, got {self.gold_every}")
        if self.gold_scorer:
            if not self.eval_prompts:
                raise ConfigError("--gold-scorer needs held-out --eval-prompts to score")
            if not (self.gold_every or self.eval_every):
                raise ConfigError("--gold-scorer needs --gold-every (or --eval-every) > 0")
            if self.eval_scorer and self.gold_scorer == self.eval_scorer:
                raise ConfigError(f"--gold-scorer {self.gold_scorer} is also --eval-scorer: the gold score must come "
                                  "from a scorer the proxy is not")
        if self.stop_on_gold_drop is not None:
            if not self.gold_scorer:
                raise ConfigError("--stop-on-gold-drop needs --gold-scorer")
            if not self.stop_on_gold_drop > 0:
                raise ConfigError(f"--stop-on-gold-drop must be > 0, got {self.stop_on_gold_drop}")
        if self.compile:
            from torch._dynamo import list_backends

            known = list_backends(exclude_tags=())
            if self.compile_backend not in known:
                raise ConfigError(f"--compile-backend {self.compile_backend!r} is not a torch.compile backend; "
                                  f"known: {', '.join(known)}")
        if self.finetune == "lora" and self.lora_targets is not None and not self.lora_targets:
            raise ConfigError("--lora-targets must name at least one module")
        for name in ("init_lora", "reference_lora"):
            if getattr(self, name) and self.finetune != "lora":
                raise ConfigError(f"--{name.replace('_', '-')} needs --finetune lora")
        if self.ncp_blocks is not None and self.ncp_blocks < 1:
            raise ConfigError(f"--ncp-blocks must be >= 1, got {self.ncp_blocks}")
        if not self.logit_std > 0:
            raise ConfigError(f"--logit-std must be > 0, got {self.logit_std}")
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise ConfigError(f"--flow-shift must be > 0, got {self.flow_shift}")
