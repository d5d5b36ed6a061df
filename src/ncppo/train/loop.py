"""The training recipe, top to bottom: `train(TrainConfig) -> TrainResult`.

Runs as one process (`ncppo train ...`) or many (`accelerate launch -m ncppo train ...`, with
DeepSpeed/FSDP from accelerate's own config). Every random draw of step k comes from generators
seeded by (seed, k, process), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import MissingPackageError
from ..manifest import write_manifest
from ..spaces.ncp import NCPConfig
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import build_dataloader, describe, fingerprint, usable_pairs
from .distributed import check_supported
from .hooks import EvalHook, GoldGuard, ValidationHook
from .step import Reference, preference_step

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    output_dir: Path
    weights_path: Path
    steps: int
    final_metrics: dict = field(default_factory=dict)
    eval_history: list = field(default_factory=list)
    stopped_early: str | None = None
    gold_stopped: bool = False  # stopped by --stop-on-gold-drop: a result (best/), not a failure


def train(config: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    config.validate()
    out = Path(config.output_dir)

    # 1. Processes, precision, trackers. accelerate keeps precision and accumulation in
    # process-wide singletons; clear them so a second train() in one process (the demo, tests,
    # notebooks) may choose its own. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    check_supported()  # FSDP/DeepSpeed asked for: refused before accelerate tries to set them up
    accelerator = Accelerator(
        # Several processes without a GPU (torchrun/mpirun on CPUs) need cpu=True for gloo.
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(config.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    check_supported(accelerator)  # FSDP/DeepSpeed: refused with what is supported
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(out)  # what a save killed midway left behind
    accelerator.wait_for_everyone()

    # 2. Data: validated pair rows, deterministic order per epoch, no replay on resume. Built (and
    # the checkpoint to resume chosen) before the models load, so bad input fails in seconds.
    _check_gold_is_not_a_labeller(config)
    dataset, dataloader, sampler = build_dataloader(config, world)
    resolution = config.resolution  # resolved by build_dataloader: a latent cache fixes its own
    identity = ckpt.run_identity(config, processes=world, data_fingerprint=fingerprint(dataset),
                                 pairs=usable_pairs(dataset, config))
    resume_candidates = ckpt.find_resume(accelerator, out, config.resume, identity, config.resume_anyway)

    # 3. Model: frozen components in the mixed-precision dtype; trainable weights stay fp32.
    from ..models import load_model

    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    adapter = load_model(config.model, family=config.family, vae=config.vae, revision=config.revision,
                         variant=config.variant, weight_dtype=weight_dtype, device=accelerator.device,
                         lazy_encoders=bool(getattr(dataset, "use_text", False)))  # cached latents + text: unused
    adapter.guidance_embedding = config.guidance_embedding  # guidance-distilled models (FLUX.1-dev) only
    process = adapter.noise_process(sampling=_level_sampling(config, adapter), shift=config.flow_shift)
    unet, reference = _trainable_unet(adapter, config, weight_dtype, accelerator.device)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    _speed_levers(config, unet, reference)
    if config.finetune == "lora":
        ckpt.register_lora_hooks(accelerator, unet, adapter)

    # 4. Optimizer and schedule.
    params = [p for p in unet.parameters() if p.requires_grad]
    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.batch_size * config.gradient_accumulation_steps * world
    optimizer = _optimizer(config, params, lr)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * world,
                                 num_training_steps=config.max_steps * world)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if config.finetune == "lora":
        reference.unet = accelerator.unwrap_model(unet)

    # 5. Resume: weights, optimizer, schedule and RNG from the checkpoint; data position from the step.
    state = {"step": 0, "micro_steps": 0, "nonfinite_skipped": 0, "fp16_overflow_skipped": 0, "skipped_rows": [],
             "eval_history": []}
    resume_from, saved = ckpt.load_resume(accelerator, resume_candidates, config.resume, identity, config.resume_anyway)
    if resume_from is not None:
        state.update(saved)
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    state["run"] = identity

    if accelerator.is_main_process:
        # The steps after the checkpoint (all of them when starting at step 0, e.g. killed before the
        # first checkpoint) are done again: drop what an earlier attempt logged for them, in
        # metrics*.jsonl and in TensorBoard.
        ckpt.rewind_logs(out, state["step"] if resume_from is not None else -1)
        if resume_from is not None and config.resume != "latest":
            ckpt.set_aside_newer(out, state["step"])  # an explicit older checkpoint starts a new branch
        purge = {"tensorboard": {"purge_step": state["step"] + 1}}
        accelerator.init_trackers("ncppo", config={k: str(v) for k, v in vars(config).items()}, init_kwargs=purge)
    accelerator.wait_for_everyone()
    ncp = NCPConfig(timestep_mode=config.timestep_mode, layers=config.ncp_layers,
                    checkpoint_encoder=config.checkpoint_encoder, precision=config.ncp_precision,
                    scale_rms=config.ncp_scale_rms, blocks=config.ncp_blocks)
    beta_scale = _beta_scale(config, accelerator, state.get("beta_scale"))
    validation = ValidationHook(config, adapter, accelerator)
    evaluation = EvalHook(config, adapter, accelerator, history=state["eval_history"])
    guard = GoldGuard(config.stop_on_gold_drop)
    if state["step"] == 0:
        evaluation.maybe_run(accelerator.unwrap_model(unet), step=0)
        _keep_best(accelerator, config, adapter, unet, evaluation, guard, 0)
    gold_stop = guard.stop_reason(state["eval_history"])  # a resumed run the guard had stopped stays stopped

    # 6. The loop.
    micro_per_epoch = len(dataloader)
    if micro_per_epoch == 0:
        raise ValueError(f"--data {config.data}: no usable pairs for batch size {config.batch_size} x {world} processes")
    epoch, skip = divmod(state["micro_steps"], micro_per_epoch)
    window, consecutive_bad, stopped = _MetricWindow(), 0, gold_stop
    progress = tqdm(total=config.max_steps, initial=state["step"], desc=config.progress_desc, unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    step_started, logged_step = time.perf_counter(), state["step"]
    unet.train()
    while state["step"] < config.max_steps and stopped is None:
        batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        skip = 0
        # accelerate's loaders re-set the sampler's epoch from their own iteration count when
        # iterated; a loader made for a resumed epoch starts that count at 0, so set it here.
        for obj in (batches, sampler, dataset):
            obj.set_epoch(epoch)
        for batch in batches:
            state["skipped_rows"].extend(batch.get("skipped", []))
            generator = _step_generator(config.seed, state["micro_steps"], rank, accelerator.device)
            with accelerator.accumulate(unet), accelerator.autocast():
                out_step = preference_step(adapter, unet, reference, batch, objective=config.objective,
                                           space=config.space, beta=config.beta, cpo_lambda=config.cpo_lambda,
                                           orpo_lambda=config.orpo_lambda, label_smoothing=config.label_smoothing,
                                           ncp=ncp, generator=generator, resolution=resolution,
                                           beta_scale=beta_scale, process=process)
                if beta_scale is not None:
                    state["beta_scale"] = beta_scale.state_dict()
                # No host sync per micro-step: a non-finite loss still runs backward, its step is skipped below.
                accelerator.backward(out_step.loss)
                window.add(out_step)
                step_ok = True
                if accelerator.sync_gradients:
                    step_ok = _optimizer_step(accelerator, config, params, optimizer, lr_scheduler, window.all_finite())
                    if step_ok and getattr(optimizer, "step_was_skipped", False):
                        state["fp16_overflow_skipped"] += 1  # the GradScaler's own skip; it lowered its scale
                    optimizer.zero_grad(set_to_none=True)
            state["micro_steps"] += 1
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done, or skipped whole when a loss or the gradients were not finite.
            state["step"] += 1
            step = state["step"]
            progress.update(1)
            if step_ok:
                consecutive_bad = 0
            else:
                state["nonfinite_skipped"] += 1
                consecutive_bad += 1
            if _logs_at(config, step):
                metrics = window.reduce(accelerator)
                if metrics:
                    metrics["lr"] = lr_scheduler.get_last_lr()[0]
                    metrics["sec_per_step"] = (time.perf_counter() - step_started) / (step - logged_step)
                    progress.set_postfix(loss=f"{metrics['loss']:.4g}", acc=f"{metrics.get('implicit_acc', 0):.2f}")
                    _log(accelerator, config, out, step, metrics, window.last_local)
                    state["last_metrics"] = metrics
                step_started, logged_step = time.perf_counter(), step
            window.clear()
            validation.maybe_run(accelerator.unwrap_model(unet), step)
            evaluation.maybe_run(accelerator.unwrap_model(unet), step)
            gold_stop = _keep_best(accelerator, config, adapter, unet, evaluation, guard, step)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                ckpt.save_checkpoint(accelerator, out, step, state, config.checkpoints_total_limit)
            if gold_stop:
                stopped = gold_stop
                break
            if consecutive_bad >= config.max_nonfinite:
                stopped = (f"{consecutive_bad} consecutive non-finite losses/gradients up to step {step}: "
                           "lower --learning-rate or --beta, or use --mixed-precision bf16/no instead of fp16")
                break
            if step >= config.max_steps:
                break
        epoch += 1
    progress.close()

    # 7. Outputs: final weights, last images, manifest.
    final_unet = accelerator.unwrap_model(unet)
    if stopped is not None:
        if not (out / f"checkpoint-{state['step']}").is_dir():
            ckpt.save_checkpoint(accelerator, out, state["step"], state, None)
        accelerator.print(f"stopped: {stopped}")
    validation.maybe_run(final_unet, state["step"], final=True)
    weights_path = out
    skipped = state["skipped_rows"]
    if world > 1:  # each process saw its own share of the bad rows
        from accelerate.utils import gather_object

        skipped = gather_object(skipped)
    best = GoldGuard.best(state["eval_history"])
    if accelerator.is_main_process:
        if gold_stop:  # the guard's result is the best evaluation's weights
            weights_path = ckpt.promote_best(out)
        elif config.finetune == "lora":
            weights_path = ckpt.save_lora_weights(adapter, final_unet, out)
        else:
            weights_path = ckpt.save_full_unet(final_unet, out, subfolder=adapter.lora_component)
        write_manifest(out / "manifest.json", command="train", config=config, seed=config.seed,
                       processes=world, steps=state["step"], stopped_early=stopped,
                       data=describe(dataset, config), nonfinite_skipped=state["nonfinite_skipped"],
                       fp16_overflow_skipped=state["fp16_overflow_skipped"],
                       skipped_rows={"count": len(skipped), "rows": skipped[:1000]},
                       final_metrics=state.get("last_metrics", {}), eval_history=state["eval_history"],
                       weights=str(weights_path), beta_normalization=_beta_record(config, beta_scale),
                       best=None if best is None else {"dir": ckpt.BEST, "step": best["step"],
                                                       "gold_score": best["gold_score"],
                                                       "proxy_score": best.get("mean_score"),
                                                       "is_result": bool(gold_stop)},
                       peak_gpu_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
        from ..publish.card import write_training_card

        write_training_card(out, family=adapter.family)  # README.md: the Hub model card, from the manifest
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, Path(weights_path), state["step"], state.get("last_metrics", {}),
                       state["eval_history"], stopped, gold_stopped=bool(gold_stop))


# ----- helpers, in the order the recipe uses them ----------------------------------------------

def _check_gold_is_not_a_labeller(config: TrainConfig) -> None:
    """--gold-scorer must not be a scorer that labelled --data (a `data generate` dataset names them)."""
    if not config.gold_scorer:
        return
    from ..data.generate import labelling_scorers

    labellers = labelling_scorers(config.data)
    if config.gold_scorer in labellers:
        from ..configs import ConfigError

        raise ConfigError(f"--gold-scorer {config.gold_scorer} labelled the pairs of --data {config.data} "
                          f"(its scorers: {', '.join(labellers)}): the gold score must come from another scorer")


def _keep_best(accelerator, config: TrainConfig, adapter, unet, evaluation, guard, step: int) -> str | None:
    """After a gold evaluation at `step`: save best/ when it is the best so far; return why the guard
    stops the run, or None. Every process calls it at the same steps and gets the same answer."""
    if not evaluation.due(step)["gold"]:
        return None
    history = evaluation.history
    reason = None
    if accelerator.is_main_process:
        best = GoldGuard.best(history)
        if best is history[-1]:
            ckpt.save_best(adapter, accelerator.unwrap_model(unet), config.output_dir,
                           {"step": step, "gold_score": best["gold_score"], "proxy_score": best.get("mean_score")},
                           lora=config.finetune == "lora")
        reason = guard.stop_reason(history)
    stop = not _all_processes(accelerator, torch.tensor(reason is None, device=accelerator.device))
    return (reason or "the gold guard stopped the run (decided on the main process)") if stop else None


def _level_sampling(config: TrainConfig, adapter):
    """How noise levels are drawn: --timestep-sampling, "auto" being the family's default."""
    from ..spaces.process import LevelSampling

    scheme = adapter.default_timestep_sampling if config.timestep_sampling == "auto" else config.timestep_sampling
    return LevelSampling(scheme, logit_mean=config.logit_mean, logit_std=config.logit_std, mode_scale=config.mode_scale)


def _trainable_unet(adapter, config: TrainConfig, weight_dtype, device):
    """(the denoiser to train (U-Net or DiT), the frozen Reference that is also the NCP encoder)."""
    from ..lora import REFERENCE_ADAPTER, adapters_disabled, load_lora_into, only_adapter

    unet = adapter.unet
    if config.finetune == "lora":
        from peft import LoraConfig

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                          init_lora_weights="gaussian",
                          target_modules=list(config.lora_targets or adapter.default_lora_targets))
        unet.add_adapter(lora)
        if config.init_lora:  # continue a LoRA (an on-policy round starts from the previous one)
            load_lora_into(unet, config.init_lora, pipeline_class=adapter.pipeline_class,
                           component=adapter.lora_component)
        base = Reference(unet, lambda: adapters_disabled(unet))
        if config.reference_lora:  # the reference is base + a frozen LoRA; the NCP encoder stays the base
            with warnings.catch_warnings():  # peft warns about a second adapter: wanted here
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                unet.add_adapter(lora, adapter_name=REFERENCE_ADAPTER)
            load_lora_into(unet, config.reference_lora, pipeline_class=adapter.pipeline_class,
                           component=adapter.lora_component, adapter_name=REFERENCE_ADAPTER)
            unet.set_adapter("default")  # add_adapter activated the new one; peft freezes the others
            base = Reference(unet, lambda: only_adapter(unet, REFERENCE_ADAPTER),
                             encoder_context=lambda: adapters_disabled(unet))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA weights train in fp32 even when the base is fp16/bf16
        return unet, base
    # Full fine-tune: a separate frozen reference (loaded again, not deep-copied from a training module).
    reference = adapter.load_denoiser(weight_dtype).to(device)
    unet.to(torch.float32).requires_grad_(True)
    return unet, Reference(reference)


def _speed_levers(config: TrainConfig, unet, reference) -> None:
    """--channels-last and --compile on the trained denoiser (and a full fine-tune's separate reference)."""
    from .speed import compile_blocks, to_channels_last

    modules = [unet] + ([reference.unet] if reference.unet is not unet else [])
    for module in modules:
        if config.channels_last:
            to_channels_last(module)
        if config.compile:
            compile_blocks(module, backend=config.compile_backend, mode=config.compile_mode)


def _beta_scale(config: TrainConfig, accelerator, saved: dict | None):
    """--beta-normalize: the error scale (summed over processes), restored from a resumed state."""
    if not config.beta_normalize:
        return None
    from ..objectives import BetaScale

    multi = accelerator.num_processes > 1
    scale = BetaScale(config.beta_normalize_batches,
                      reduce=(lambda t: accelerator.reduce(t, reduction="sum")) if multi else None)
    if saved:
        scale.load_state_dict(saved)
    return scale


def _beta_record(config: TrainConfig, scale) -> dict | None:
    """The manifest's account of a normalised beta: the measured scale and the beta it gave."""
    if scale is None:
        return None
    value = scale.value
    return dict(beta=config.beta, error_scale=value, effective_beta=config.beta / value if value else None,
                frozen=scale.frozen, **scale.state_dict())


def _optimizer(config: TrainConfig, params, lr):
    kwargs = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise MissingPackageError("--optimizer adamw8bit needs bitsandbytes: pip install 'ncppo[bnb]'") from err
        return bnb.optim.AdamW8bit(params, **kwargs)
    # The fused CUDA kernel: one launch for all LoRA tensors instead of several per tensor.
    fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def _step_generator(seed: int, micro: int, rank: int, device) -> torch.Generator:
    """The generator of one micro-step: a pure function of (seed, micro-step, process)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + micro * 1_009 + rank) % (2**63 - 1))
    return g


def _optimizer_step(accelerator, config: TrainConfig, params, optimizer, lr_scheduler, finite: torch.Tensor) -> bool:
    """Clip, then step unless a loss (or, without fp16's GradScaler, the gradient norm) was not finite
    on some process; returns whether the step was taken. With fp16 the GradScaler owns overflow: inf
    gradients make it skip the step and lower its scale, which is not a failure of the run. A step
    skipped here is still reported to it (update()), or its next unscale would raise."""
    scaler = accelerator.scaler
    if config.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
        if scaler is None:
            finite = finite & torch.isfinite(torch.as_tensor(norm, device=finite.device))
    ok = _all_processes(accelerator, finite)  # the one host sync of an optimizer step
    if ok:
        optimizer.step()  # fp16: the scaler may still skip it (overflow)
        lr_scheduler.step()  # accelerate's scheduler skips with it
    elif scaler is not None:
        if config.max_grad_norm <= 0:
            accelerator.unscale_gradients()  # update() needs the inf check that unscaling records
        scaler.update()
    return ok


def _all_processes(accelerator, flag: torch.Tensor) -> bool:
    """True only if the boolean tensor `flag` is True on every process (so all skip a bad step together)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = (~flag).float().reshape(1).to(accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() == 0)


class _MetricWindow:
    """The metrics of one optimizer step's micro-steps, kept on the device (no host sync) until a log
    step averages them over the finite micro-steps, then across processes."""

    def __init__(self):
        self.keys: list[str] | None = None
        self.sums = self.count = self.finite = None
        self.last_local: dict[str, float] = {}

    def add(self, out) -> None:
        values = {"loss": out.loss.detach(), **out.metrics}
        if self.keys is None:
            self.keys = sorted(values)
        stacked = torch.stack([values[k].detach().reshape(()).double() for k in self.keys])
        finite = torch.isfinite(stacked[self.keys.index("loss")])
        contribution = torch.where(finite, stacked, torch.zeros_like(stacked))
        if self.sums is None:
            self.sums, self.count, self.finite = contribution, finite.double(), finite
        else:
            self.sums, self.count, self.finite = self.sums + contribution, self.count + finite, self.finite & finite

    def all_finite(self) -> torch.Tensor:
        """A boolean tensor: every loss since the last clear() was finite."""
        return self.finite if self.finite is not None else torch.tensor(True)

    def clear(self) -> None:
        self.sums = self.count = self.finite = None

    def reduce(self, accelerator) -> dict[str, float]:
        """Per-process means, averaged over the processes that had a finite loss. Every process takes
        part in the collective, also one whose losses were all non-finite (else the others hang)."""
        if self.sums is None:  # the same on every process: they run the same number of micro-steps
            return {}
        has = (self.count > 0).double()
        local = self.sums / self.count.clamp(min=1)
        if bool(has):
            self.last_local = dict(zip(self.keys, local.tolist()))
        packed = torch.cat([local * has, has.reshape(1)])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        if not float(packed[-1]) > 0:
            return {}
        return dict(zip(self.keys, (packed[:-1] / packed[-1]).tolist()))


def _logs_at(config: TrainConfig, step: int) -> bool:
    return config.log_rank_metrics or step % config.log_every == 0 or step == config.max_steps


def _log(accelerator, config: TrainConfig, out: Path, step: int, metrics: dict, local: dict) -> None:
    if config.log_rank_metrics:
        with open(out / f"metrics_rank{accelerator.process_index}.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **local}) + "\n")
    if step % config.log_every and step != config.max_steps:  # --log-rank-metrics reduces every step
        return
    if accelerator.is_main_process:
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        accelerator.log({f"train/{k}": v for k, v in metrics.items() if math.isfinite(v)}, step=step)
