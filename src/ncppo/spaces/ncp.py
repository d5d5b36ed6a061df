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

The target takes the same path with the true prediction (``latent.prediction_target``). Every mode's
x' is affine in the prediction, so x'_pred - x'_true = g_t * (prediction - target) with a per-sample
gain g_t (``ncp_gain``): the difference is computed exactly in float32, never by cancellation, a
perfect prediction has error exactly 0, and so has t = 0 in "t-1" mode (g = 0).

``layers``: "down" = the last down block's output (default); "mid" = the mid block's output;
"multi" = conv_in and every down level, each level's error divided by the variance of its target
features over the batch (one detached scalar per level) and then averaged, so levels weigh alike.

Precision (``precision``, see ``ncppo.spaces.precision``): in "t-1" mode the difference is ~1e-3 rms,
below bf16's resolution; the default compares f(x'_true + s d) with f(x'_true), s magnifying d to
rms 0.1, divided by s^2, wherever the encoder does not run in exact fp32.

Cost and gradients: the target, the reference and the policy inputs each take one encoder call of
2B samples (the same batch shape, so equal predictions give bit-equal errors); only the policy's
keeps autograd. Gradients reach ``policy_pred`` through the encoder's activations; the encoder's
weights must be frozen (checked) and get none. With LoRA the encoder is the same U-Net with its
adapters disabled (the default ``encoder_context``): no copy of the U-Net. ``checkpoint_encoder``
recomputes the policy's encoder pass in backward block by block (diffusers' resnet /
transformer-block checkpointing), each recompute with the adapters disabled again; the U-Net's own
checkpointing setting never applies to the encoder pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from . import precision
from .latent import prediction_target, prediction_type
from .perception import Perception, base_model

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
    precision: str = field(
        default="auto",
        metadata={"help": "how the nearly equal encoder inputs are compared: scaled (difference magnified to "
                          "rms scale_rms, correct in bf16/fp16/TF32), fp32 (exact, ~7x slower on a GPU), native "
                          "(as computed: exact only in full fp32), auto (native where exact, else scaled)",
                  "choices": list(precision.METHODS)},
    )
    scale_rms: float = field(
        default=0.1,
        metadata={"help": "precision 'scaled': the rms each input difference is magnified to"},
    )
    blocks: int | None = field(
        default=None,
        metadata={"help": "DiTs (SD3, FLUX): transformer blocks the encoder runs (joint/double-stream first); "
                          "None = half the joint/double-stream blocks. U-Nets ignore it"},
    )

    def __post_init__(self):
        if self.timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}, got {self.timestep_mode!r}")
        if self.layers not in LAYERS:
            raise ValueError(f"layers must be one of {LAYERS}, got {self.layers!r}")
        if self.precision not in precision.METHODS:
            raise ValueError(f"precision must be one of {precision.METHODS}, got {self.precision!r}")
        if not self.scale_rms > 0:
            raise ValueError(f"scale_rms must be > 0, got {self.scale_rms}")
        if self.blocks is not None and self.blocks < 1:
            raise ValueError(f"blocks must be >= 1 (or None), got {self.blocks}")


_base = base_model  # the UNet2DConditionModel inside a peft PeftModel (or the model itself)


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
    encoder_hidden_states = encoder_hidden_states.to(sample.dtype)
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


def _x0_eps_coefficients(scheduler, timesteps, like) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_x, k_e): how x0_hat and eps_hat move per unit of the prediction, x0_and_eps being affine in it."""
    abar = _per_sample(scheduler.alphas_cumprod, timesteps, like)
    a, s = abar**0.5, (1 - abar) ** 0.5
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return -s / a, torch.ones_like(a)
    if kind == "v_prediction":
        return -s, a
    return torch.ones_like(a), -a / s


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


def _posterior_coefficients(scheduler, timesteps, like):
    """(c_x0, c_xt, sigma) of the DDPM posterior q(x_{t-1} | x_t, x0) (DDPM eq. 7) per sample."""
    abar_t = _per_sample(scheduler.alphas_cumprod, timesteps, like)
    abar_prev = _per_sample(scheduler.alphas_cumprod, (timesteps - 1).clamp_min(0), like)
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    c_x0 = (abar_prev**0.5 * beta_t) / (1 - abar_t)
    c_xt = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
    if scheduler.config.variance_type == "fixed_small":
        variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)
    else:
        variance = beta_t
    return c_x0, c_xt, variance**0.5


def posterior_step(scheduler, model_output, x_t, timesteps, variance_noise) -> torch.Tensor:
    """x_{t'} with t' = max(t - 1, 0) per sample: ``DDPMScheduler.step`` batched over per-sample t with
    the given variance noise, except that t = 0 maps to x_t itself (identity), in float32."""
    _check_scheduler(scheduler)
    c_x0, c_xt, sigma = _posterior_coefficients(scheduler, timesteps, x_t)
    x0_hat, _ = x0_and_eps(scheduler, model_output, x_t, timesteps)
    x_prev = c_x0 * x0_hat + c_xt * x_t.float() + sigma * variance_noise.float()
    at_zero = (timesteps == 0).view(-1, *([1] * (x_t.ndim - 1)))
    return torch.where(at_zero, x_t.float(), x_prev)


def ncp_gain(scheduler, timestep_mode, timesteps, t_prime, like) -> torch.Tensor:
    """Per-sample g with x'_pred - x'_true = g * (prediction - target): every mode's x' is affine in the
    prediction. Computing the difference this way keeps it exact in float32 (no cancellation)."""
    k_x, k_e = _x0_eps_coefficients(scheduler, timesteps, like)
    if timestep_mode == "t-1":
        _check_scheduler(scheduler)
        c_x0, _, _ = _posterior_coefficients(scheduler, timesteps, like)
        return torch.where((timesteps == 0).view(k_x.shape), 0.0, c_x0 * k_x)
    abar_prime = _per_sample(scheduler.alphas_cumprod, t_prime, like)
    if timestep_mode == "uniform":
        return abar_prime**0.5 * k_x + (1 - abar_prime) ** 0.5 * k_e
    if timestep_mode == "same":
        return abar_prime**0.5 * k_x
    raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}, got {timestep_mode!r}")


def ncp_target(scheduler, timestep_mode, *, x0, x_t, noise, timesteps, variance_noise=None, t_prime=None):
    """(t', x'_true): the noise level the encoder looks at and the true target's input there, float32."""
    if timestep_mode == "t-1":
        target = prediction_target(scheduler, x0, noise, timesteps)
        return (timesteps - 1).clamp_min(0), posterior_step(scheduler, target, x_t, timesteps, variance_noise)
    if timestep_mode == "same":
        t_prime = timesteps
    elif timestep_mode != "uniform":
        raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}, got {timestep_mode!r}")
    return t_prime, scheduler.add_noise(x0.float(), noise.float(), t_prime)


def ncp_differences(scheduler, timestep_mode, *, x0, noise, timesteps, t_prime, predictions) -> list[torch.Tensor]:
    """x'_pred - x'_true for each prediction, float32 (the policy's keeps its autograd graph)."""
    target = prediction_target(scheduler, x0, noise, timesteps).float()
    gain = ncp_gain(scheduler, timestep_mode, timesteps, t_prime, target)
    return [gain * (p.float() - target) for p in predictions]


def ncp_inputs(
    scheduler, timestep_mode, *, x0, x_t, noise, timesteps, predictions, variance_noise=None, t_prime=None
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(t', [x'_pred of each prediction], x'_true): the exact encoder inputs, float32."""
    t_prime, target = ncp_target(scheduler, timestep_mode, x0=x0, x_t=x_t, noise=noise, timesteps=timesteps,
                                 variance_noise=variance_noise, t_prime=t_prime)
    diffs = ncp_differences(scheduler, timestep_mode, x0=x0, noise=noise, timesteps=timesteps, t_prime=t_prime,
                            predictions=predictions)
    return t_prime, [target + d for d in diffs], target


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


def _encoder_modules(unet, layers: str) -> list[torch.nn.Module]:
    """The U-Net submodules an encoder pass runs (what the "fp32" precision upcasts)."""
    unet = _base(unet)
    names = ["conv_in", "time_embedding", "add_embedding", "encoder_hid_proj", "down_blocks"]
    names += ["mid_block"] if layers == "mid" else []
    return [m for m in (getattr(unet, n, None) for n in names) if m is not None]


class UNetPerception(Perception):
    """The U-Net's encoder (``encoder_features``: conv_in -> down blocks (-> mid block)) conditioned on the
    batch's text states (and SDXL's added conditioning); block checkpointing by diffusers' own flags."""

    def __init__(self, unet, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None = None,
                 layers: str = "down", context=None):
        super().__init__(unet, context)
        self.encoder_hidden_states, self.added_cond_kwargs, self.layers = encoder_hidden_states, added_cond_kwargs, layers
        self.normalize_levels = layers == "multi"

    def features(self, x, levels, recompute=None):
        with _block_checkpointing(_base(self.network), recompute):
            return encoder_features(self.network, x, levels, self.encoder_hidden_states, self.added_cond_kwargs,
                                    self.layers)

    def exact_modules(self):
        return _encoder_modules(self.network, self.layers)


def perceptual_errors(
    process,
    perception: Perception,
    *,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    policy_pred: torch.Tensor,
    reference_pred: torch.Tensor | None = None,
    config: NCPConfig | None = None,
    generator: torch.Generator | None = None,
    draws: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample NCP errors (2B,) of the policy and of the reference (None without reference_pred), for
    any noise process (``ncppo.spaces.process``) and frozen encoder (``ncppo.spaces.perception``).

    ``timesteps`` are the process's levels. The mode's random draws (DDPM "t-1": ``variance_noise``
    (2B, ...); "uniform": ``t_prime`` (2B,)) come from ``generator``, one per pair, unless ``draws``
    holds them. Precision: ``config.precision`` (see ``ncppo.spaces.precision``).
    """
    config = config or NCPConfig()
    n = x_t.shape[0]
    if n % 2 or timesteps.shape != (n,) or policy_pred.shape != x_t.shape:
        raise ValueError(
            f"ncp_errors wants 2B samples (winners then losers): x_t {tuple(x_t.shape)}, "
            f"timesteps {tuple(timesteps.shape)}, policy_pred {tuple(policy_pred.shape)}"
        )
    perception.check_frozen()
    draws = dict(draws or {})
    if "variance_noise" in draws and draws["variance_noise"].shape != x_t.shape:
        raise ValueError(f"variance_noise shape {tuple(draws['variance_noise'].shape)} != x_t shape {tuple(x_t.shape)}")
    if "t_prime" in draws and draws["t_prime"].shape != (n,):
        raise ValueError(f"t_prime must have shape ({n},), got {tuple(draws['t_prime'].shape)}")
    drawn = process.ncp_draws(config.timestep_mode, n // 2, x_t, generator) if not _has_draws(config, draws) else {}
    draws = {**{k: v.to(x_t.device) for k, v in draws.items()}, **drawn}

    predictions = [policy_pred] + ([] if reference_pred is None else [reference_pred])
    t_prime, target, gain = process.ncp_step(config.timestep_mode, x0=x0, x_t=x_t, noise=noise, levels=timesteps,
                                             draws=draws)
    true = process.target(x0, noise, timesteps).float()
    differences = [gain * (p.float() - true) for p in predictions]

    exact_modules = perception.exact_modules()
    method = precision.resolve_method(config.precision, exact_modules, x_t.device)
    # Checkpointing recomputes each block in backward, when the adapters are enabled again (and the
    # fp32 weight copies are gone), so each recompute re-enters both itself.
    if method == "fp32":
        recompute_context = lambda m: _both(perception.frozen_module(m), precision.float32_weights([m], x_t.device.type))  # noqa: E731
    else:
        recompute_context = perception.frozen_module
    recompute = _recompute_under(recompute_context) if config.checkpoint_encoder and torch.is_grad_enabled() else None

    def encode(x, with_grad):  # the frozen encoder at t', conditioned like the batch
        if not with_grad:
            with perception.frozen(), torch.no_grad():
                return perception.features(x, t_prime)
        with perception.frozen():
            return perception.features(x, t_prime, recompute)

    errors = precision.feature_errors(encode, target, differences, method=method, scale_rms=config.scale_rms,
                                      normalize_levels=perception.normalize_levels, exact_modules=exact_modules)
    return errors[0], (errors[1] if reference_pred is not None else None)


def _has_draws(config: NCPConfig, draws: dict) -> bool:
    """True when ``draws`` already holds what the mode would draw."""
    needed = {"t-1": "variance_noise", "uniform": "t_prime"}.get(config.timestep_mode)
    return needed is None or needed in draws


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
    """Per-sample NCP errors (2B,) of a U-Net's policy and reference predictions (None without
    reference_pred): ``perceptual_errors`` with the DDPM process of ``scheduler`` and ``UNetPerception``.

    ``encoder``: the U-Net whose encoder embeds (its weights must be frozen). ``encoder_context``: a
    zero-argument callable returning the context under which ``encoder`` is the frozen base network;
    default ``lambda: adapters_disabled(encoder)`` (a no-op without LoRA). Random draws: the "t-1"
    variance noise (B, C, H, W) and the "uniform" t' (B,) come from ``generator`` (one per pair,
    repeated for the losers) unless ``variance_noise`` (2B, C, H, W) / ``t_prime`` (2B,) are given.
    Precision: ``config.precision`` (see ``ncppo.spaces.precision``).
    """
    from .process import as_process

    config = config or NCPConfig()
    perception = UNetPerception(encoder, encoder_hidden_states, added_cond_kwargs, config.layers, encoder_context)
    draws = {k: v for k, v in (("variance_noise", variance_noise), ("t_prime", t_prime)) if v is not None}
    return perceptual_errors(as_process(scheduler), perception, x0=x0, x_t=x_t, noise=noise, timesteps=timesteps,
                             policy_pred=policy_pred, reference_pred=reference_pred, config=config,
                             generator=generator, draws=draws)


@contextmanager
def _both(first, second):
    with first, second:
        yield
