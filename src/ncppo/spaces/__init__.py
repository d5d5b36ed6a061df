"""Where preference errors are measured: "latent" (Diffusion-DPO) or "ncp" (the frozen denoiser's encoder).

Both give per-sample errors (2B,), winners then losers, for the policy and for the reference. What
differs between model families comes in as two objects, never as a family name: the noise
``process`` (``ncppo.spaces.process``: DDPM for U-Nets, rectified flow for SD3/FLUX) and, for NCP,
the ``perception`` (``ncppo.spaces.perception``: the U-Net's down blocks or a DiT's first k blocks).
A model adapter builds both (``ModelAdapter.noise_process`` / ``.perception``).
"""

from __future__ import annotations

import torch

from . import latent, ncp
from .latent import latent_errors, prediction_target
from .ncp import NCPConfig, UNetPerception, encoder_features, ncp_errors, perceptual_errors
from .process import as_process

SPACES = ("latent", "ncp")

__all__ = [
    "SPACES", "NCPConfig", "UNetPerception", "as_process", "compute_errors", "encoder_features", "latent",
    "latent_errors", "ncp", "ncp_errors", "perceptual_errors", "prediction_target",
]  # fmt: skip


def compute_errors(
    space: str,
    *,
    scheduler=None,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    policy_pred: torch.Tensor,
    reference_pred: torch.Tensor | None = None,
    encoder=None,
    x_t: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    added_cond_kwargs: dict | None = None,
    config: NCPConfig | None = None,
    generator: torch.Generator | None = None,
    variance_noise: torch.Tensor | None = None,
    t_prime: torch.Tensor | None = None,
    encoder_context=None,
    process=None,
    perception=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(policy errors, reference errors or None) in ``space``.

    The noise process is ``process`` or that of ``scheduler`` (a DDPM-style or FlowMatchEulerDiscrete
    scheduler, see ``as_process``); ``timesteps`` are its levels. For "ncp" the frozen encoder is
    ``perception``, or a U-Net ``encoder`` with ``encoder_hidden_states`` / ``added_cond_kwargs`` /
    ``encoder_context`` (``UNetPerception``); the other keywords are those of ``ncp.ncp_errors``.
    "latent" ignores the NCP-only ones, so a loop passes the same keywords to both."""
    if process is None and scheduler is None:
        raise ValueError("compute_errors needs a scheduler or a process")
    process = as_process(process if process is not None else scheduler)
    if space == "latent":
        target = process.target(x0, noise, timesteps)
        reference = None if reference_pred is None else latent_errors(reference_pred, target)
        return latent_errors(policy_pred, target), reference
    if space == "ncp":
        config = config or NCPConfig()
        if perception is None:
            missing = [k for k, v in (("encoder", encoder), ("encoder_hidden_states", encoder_hidden_states)) if v is None]
            if missing:
                raise ValueError(f"space 'ncp' needs {', '.join(missing)} (or a perception)")
            perception = UNetPerception(encoder, encoder_hidden_states, added_cond_kwargs, config.layers, encoder_context)
        if x_t is None:
            raise ValueError("space 'ncp' needs x_t")
        draws = {k: v for k, v in (("variance_noise", variance_noise), ("t_prime", t_prime)) if v is not None}
        return perceptual_errors(process, perception, x0=x0, x_t=x_t, noise=noise, timesteps=timesteps,
                                 policy_pred=policy_pred, reference_pred=reference_pred, config=config,
                                 generator=generator, draws=draws)
    raise ValueError(f"unknown error space {space!r}; choose one of {SPACES}")
