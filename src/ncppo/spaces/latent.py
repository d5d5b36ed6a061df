"""Latent-space errors (Diffusion-DPO): per-sample MSE between a U-Net prediction and its target."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler) -> str:
    """The scheduler's ``config.prediction_type``, checked."""
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unsupported scheduler prediction_type {kind!r}; supported: {PREDICTION_TYPES}")
    return kind


def prediction_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What a perfect U-Net predicts for x_t = add_noise(x0, noise, t), by the scheduler's prediction type:
    the noise (epsilon), v = sqrt(abar) noise - sqrt(1 - abar) x0 (v_prediction) or x0 (sample)."""
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return x0


def latent_errors(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch dims (C,H,W), in float32: shape (N,)."""
    if model_pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(model_pred.shape)} != target shape {tuple(target.shape)}")
    return (model_pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, model_pred.ndim)))


def errors(
    scheduler,
    *,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    policy_pred: torch.Tensor,
    reference_pred: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(policy errors, reference errors or None), each (N,)."""
    target = prediction_target(scheduler, x0, noise, timesteps)
    reference = None if reference_pred is None else latent_errors(reference_pred, target)
    return latent_errors(policy_pred, target), reference
