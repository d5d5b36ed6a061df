"""Noise-conditioned perception (NCP, arXiv 2406.17636): errors in the frozen U-Net's own encoder.

A batch holds 2B samples, winners then losers; a pair shares its noise eps and timestep t, and
x_t = add_noise(x0, eps, t). The NCP error of a prediction is (paper eq. 13, mean not sum)

    PL = mean over C,H,W of ( f(x'_pred, c, t') - f(x'_true, c, t') )^2

with f = conv_in -> down blocks (-> mid block) of the FROZEN U-Net at timestep t' and text
conditioning c, and x'_pred / x'_true = x_t brought to the noise level t' with the prediction /
with the true target. How (``timestep_mode``):

  "t-1"      one DDPM posterior step to t' = max(t - 1, 0), as ``DDPMScheduler.step``, with ONE
             variance noise z shared by policy, reference and target (and by a pair's two images).
             At t = 0 the step is the identity (as in the paper's code), so the error is exactly 0.
  "uniform"  x0_hat and eps_hat from the prediction, re-noised at a fresh t' ~ U[0, T) shared by a
             pair: x' = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') eps_hat.
  "same"     x0_hat re-noised at t' = t with the TRUE noise eps. (Re-noising with eps_hat at t would
             give back x_t exactly, whatever the prediction.)

The target takes the same path with the true prediction (``latent.prediction_target``), so a perfect
prediction has zero error up to rounding. The x_t' arithmetic runs in float32.

``layers``: "down" = the last down block's output (default); "mid" = the mid block's output;
"multi" = conv_in and every down level, each level's error divided by the variance of its target
features over the batch (one detached scalar per level) and then averaged, so levels weigh alike.

Cost and gradients: the policy input goes through the encoder with autograd, the reference and the
target inputs together in ONE no-grad call (batching the policy with them would make autograd keep
and differentiate all three). Gradients reach ``policy_pred`` through the encoder's activations; the
encoder's weights must be frozen (checked) and get none. With LoRA the encoder is the same U-Net with
its adapters disabled (the default ``encoder_context``): no copy of the U-Net. ``checkpoint_encoder``
recomputes the policy's encoder pass in backward block by block (diffusers' resnet / transformer-block
checkpointing), each recompute with the adapters disabled again; the U-Net's own checkpointing
setting never applies to the encoder pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from ..lora import adapters_disabled
from .latent import prediction_target, prediction_type

TIMESTEP_MODES = ("t-1", "uniform", "same")
LAYERS = ("down", "mid", "multi")


@dataclass
class NCPConfig:
    timestep_mode: str = field(
        default="t-1",
        metadata={"help": "noise level t' of the perceptual comparison", "choices": list(TIMESTEP_MODES)},
    )
    layers: str = field(
        default="down",
        metadata={"help": "encoder output compared: last down block, mid block, or all levels", "choices": list(LAYERS)},
    )
    checkpoint_encoder: bool = field(
        default=False,
        metadata={"help": "recompute the policy's encoder pass block by block in backward (less memory, more time)"},
    )

    def __post_init__(self):
        if self.timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}, got {self.timestep_mode!r}")
        if self.layers not in LAYERS:
            raise ValueError(f"layers must be one of {LAYERS}, got {self.layers!r}")


def _base(unet):
    """The UNet2DConditionModel inside a peft PeftModel (or the model itself)."""
    return unet.get_base_model() if hasattr(unet, "get_base_model") else unet


def encoder_features(
    unet,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict | None = None,
    layers: str = "down",
) -> list[torch.Tensor]:
    """The U-Net's encoder features of ``sample``, as in ``UNet2DConditionModel.forward`` up to the
    down blocks ("down": [last down output]; "multi": [conv_in, each down level]) or the mid block
    ("mid": [mid output]). Runs whatever adapters are enabled: disable them for the NCP encoder."""
    unet = _base(unet)
    if unet.class_embedding is not None or unet.config.addition_embed_type == "image_hint":
        raise NotImplementedError("NCP features: U-Nets with class embeddings or image hints are not supported")
    added_cond_kwargs = added_cond_kwargs or {}
    sample = sample.to(unet.conv_in.weight.dtype)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    # 1. time embedding (+ SDXL's text_time embedding) and text conditioning
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs)

    # 2. conv_in -> down blocks (-> mid block)
    h = unet.conv_in(sample)
    levels = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        levels.append(h)
    if layers == "multi":
        return levels
    if layers == "down":
        return [h]
    if layers != "mid":
        raise ValueError(f"layers must be one of {LAYERS}, got {layers!r}")
    if getattr(unet.mid_block, "has_cross_attention", False):
        return [unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)]
    return [unet.mid_block(h, emb)]


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Scheduler table ``values`` at each sample's timestep, float32, shaped (N, 1, 1, 1) to broadcast."""
    return values.to(like.device)[timesteps].float().view(-1, *([1] * (like.ndim - 1)))


def x0_and_eps(scheduler, model_output, x_t, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) implied by a prediction of the scheduler's prediction type, float32."""
    abar = _per_sample(scheduler.alphas_cumprod, timesteps, x_t)
    a, s = abar**0.5, (1 - abar) ** 0.5
    x_t, out = x_t.float(), model_output.float()
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return (x_t - s * out) / a, out
    if kind == "v_prediction":
        return a * x_t - s * out, a * out + s * x_t
    return out, (x_t - a * out) / s


def _check_scheduler(scheduler):
    cfg = scheduler.config
    if cfg.get("clip_sample", False) or cfg.get("thresholding", False):
        raise ValueError(
            "NCP needs a scheduler with clip_sample=False and thresholding=False (as in the SD/SDXL "
            "scheduler configs): clipping x0_hat to [-1, 1] would distort latents"
        )
    if cfg.get("variance_type", "fixed_small") not in ("fixed_small", "fixed_large"):
        raise ValueError(f"NCP supports variance_type fixed_small or fixed_large, got {cfg.variance_type!r}")


def posterior_step(scheduler, model_output, x_t, timesteps, variance_noise) -> torch.Tensor:
    """x_{t'} with t' = max(t - 1, 0) per sample: ``DDPMScheduler.step`` batched over per-sample t with
    the given variance noise, except that t = 0 maps to x_t itself (identity), in float32."""
    _check_scheduler(scheduler)
    t = timesteps
    abar_t = _per_sample(scheduler.alphas_cumprod, t, x_t)
    abar_prev = _per_sample(scheduler.alphas_cumprod, (t - 1).clamp_min(0), x_t)
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    x0_hat, _ = x0_and_eps(scheduler, model_output, x_t, t)
    # posterior mean, DDPM eq. 7
    mean = (abar_prev**0.5 * beta_t) / (1 - abar_t) * x0_hat + alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t) * x_t.float()
    if scheduler.config.variance_type == "fixed_small":
        variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)
    else:
        variance = beta_t
    x_prev = mean + variance**0.5 * variance_noise.float()
    at_zero = (t == 0).view(-1, *([1] * (x_t.ndim - 1)))
    return torch.where(at_zero, x_t.float(), x_prev)


def ncp_inputs(
    scheduler, timestep_mode, *, x0, x_t, noise, timesteps, predictions, variance_noise=None, t_prime=None
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(t', [x_t' of each prediction], x_t' of the true target): the encoder inputs, float32."""
    preds = [*predictions, prediction_target(scheduler, x0, noise, timesteps)]
    if timestep_mode == "t-1":
        t_prime = (timesteps - 1).clamp_min(0)
        inputs = [posterior_step(scheduler, p, x_t, timesteps, variance_noise) for p in preds]
    elif timestep_mode == "uniform":
        inputs = [scheduler.add_noise(*x0_and_eps(scheduler, p, x_t, timesteps), t_prime) for p in preds]
    elif timestep_mode == "same":
        t_prime = timesteps
        inputs = [scheduler.add_noise(x0_and_eps(scheduler, p, x_t, timesteps)[0], noise.float(), t_prime) for p in preds]
    else:
        raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}, got {timestep_mode!r}")
    return t_prime, inputs[:-1], inputs[-1]


@contextmanager
def _block_checkpointing(unet, recompute):
    """diffusers' block checkpointing (resnets and transformer blocks) set for the encoder pass: off
    (recompute None) or on with ``recompute(module, *args)``; the U-Net's own setting is restored after.
    The U-Net's own setting must never reach the encoder pass: its recompute runs in backward, when
    the LoRA adapters are enabled again."""
    modules = [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
    saved = [(m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func")) for m in modules]
    for m in modules:
        m.gradient_checkpointing = recompute is not None
        m._gradient_checkpointing_func = recompute
    try:
        yield
    finally:
        for m, (flag, func) in zip(modules, saved):
            m.gradient_checkpointing = flag
            m._gradient_checkpointing_func = func


def _recompute_under(context_of):
    """A checkpoint function whose recompute (during backward) runs ``module`` under ``context_of(module)``."""

    def recompute(module, *args):
        def run(*inputs):
            with context_of(module):
                return module(*inputs)

        return checkpoint(run, *args, use_reentrant=False)

    return recompute


def _repeat_batch(x: torch.Tensor, copies: int = 2) -> torch.Tensor:
    """``copies`` copies of x along the batch: a pair's draw for winners and losers, or conditioning."""
    return torch.cat([x] * copies)


def _feature_errors(features, targets, scales) -> torch.Tensor:
    per_level = [
        (f.float() - g.float()).pow(2).mean(dim=tuple(range(1, f.ndim))) / s for f, g, s in zip(features, targets, scales)
    ]
    return torch.stack(per_level).mean(0)


def ncp_errors(
    encoder,
    scheduler,
    *,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    policy_pred: torch.Tensor,
    reference_pred: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict | None = None,
    config: NCPConfig | None = None,
    generator: torch.Generator | None = None,
    variance_noise: torch.Tensor | None = None,
    t_prime: torch.Tensor | None = None,
    encoder_context=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample NCP errors (2B,) of the policy and of the reference (None without reference_pred).

    ``encoder``: the U-Net whose encoder embeds (its weights must be frozen). ``encoder_context``: a
    zero-argument callable returning the context under which ``encoder`` is the frozen base network;
    default ``lambda: adapters_disabled(encoder)`` (a no-op without LoRA). Random draws: the "t-1"
    variance noise (B, C, H, W) and the "uniform" t' (B,) come from ``generator`` (one per pair,
    repeated for the losers) unless ``variance_noise`` (2B, C, H, W) / ``t_prime`` (2B,) are given.
    """
    config = config or NCPConfig()
    n = x_t.shape[0]
    if n % 2 or timesteps.shape != (n,) or policy_pred.shape != x_t.shape:
        raise ValueError(
            f"ncp_errors wants 2B samples (winners then losers): x_t {tuple(x_t.shape)}, "
            f"timesteps {tuple(timesteps.shape)}, policy_pred {tuple(policy_pred.shape)}"
        )
    device = generator.device if generator is not None else x_t.device
    if config.timestep_mode == "t-1":
        if variance_noise is None:
            variance_noise = _repeat_batch(torch.randn((n // 2, *x_t.shape[1:]), generator=generator, device=device))
        if variance_noise.shape != x_t.shape:
            raise ValueError(f"variance_noise shape {tuple(variance_noise.shape)} != x_t shape {tuple(x_t.shape)}")
        variance_noise = variance_noise.to(x_t.device)
    if config.timestep_mode == "uniform":
        if t_prime is None:
            T = scheduler.config.num_train_timesteps
            t_prime = _repeat_batch(torch.randint(0, T, (n // 2,), generator=generator, device=device))
        if t_prime.shape != (n,):
            raise ValueError(f"t_prime must have shape ({n},), got {tuple(t_prime.shape)}")
        t_prime = t_prime.to(x_t.device)
    predictions = [policy_pred] + ([] if reference_pred is None else [reference_pred])
    t_prime, inputs, target = ncp_inputs(
        scheduler, config.timestep_mode, x0=x0, x_t=x_t, noise=noise, timesteps=timesteps,
        predictions=predictions, variance_noise=variance_noise, t_prime=t_prime,
    )  # fmt: skip

    context = encoder_context or (lambda: adapters_disabled(encoder))
    added = added_cond_kwargs or {}

    def features(x, copies=1):  # the encoder at t', conditioned like the batch (repeated `copies` times)
        cond = _repeat_batch(encoder_hidden_states, copies)
        added_cond = {k: _repeat_batch(v, copies) for k, v in added.items()}
        return encoder_features(encoder, x, _repeat_batch(t_prime, copies), cond, added_cond, config.layers)

    # reference and target: one batched call, no autograd
    with context(), torch.no_grad():
        trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the NCP encoder must be frozen, but {len(trainable)} weights require grad, e.g. {trainable[0]}")
        fixed = [level.chunk(len(inputs)) for level in features(torch.cat(inputs[1:] + [target]), len(inputs))]
    target_features = [level[-1] for level in fixed]

    # policy: its own call with autograd. Checkpointing recomputes each resnet / transformer block in
    # backward, when the adapters are enabled again, so each recompute disables them itself (only that
    # block's: cheap) or enters the caller's encoder context.
    recompute = None
    if config.checkpoint_encoder and torch.is_grad_enabled():
        recompute = _recompute_under(adapters_disabled if encoder_context is None else (lambda m: encoder_context()))
    with context(), _block_checkpointing(_base(encoder), recompute):
        policy_features = features(inputs[0])

    scales = [g.float().var().clamp_min(1e-12) for g in target_features] if config.layers == "multi" else [1.0]
    policy_errors = _feature_errors(policy_features, target_features, scales)
    reference_errors = None
    if reference_pred is not None:
        reference_errors = _feature_errors([level[0] for level in fixed], target_features, scales)
    if config.timestep_mode == "t-1":
        # identity step at t = 0: all inputs are x_t; make the 0 exact (batch sizes may round differently)
        identity = timesteps == 0
        policy_errors = torch.where(identity, 0.0, policy_errors)
        if reference_errors is not None:
            reference_errors = torch.where(identity, 0.0, reference_errors)
    return policy_errors, reference_errors
