"""Where preference errors are measured: "latent" (Diffusion-DPO) or "ncp" (the frozen U-Net encoder).

Both give per-sample errors (2B,), winners then losers, for the policy and for the reference.
"""

from __future__ import annotations

import torch

from . import latent, ncp
from .latent import latent_errors, prediction_target
from .ncp import NCPConfig, encoder_features, ncp_errors

SPACES = ("latent", "ncp")

__all__ = [
    "SPACES", "NCPConfig", "compute_errors", "encoder_features", "latent", "latent_errors", "ncp", "ncp_errors",
    "prediction_target",
]  # fmt: skip


def compute_errors(
    space: str,
    *,
    scheduler,
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(policy errors, reference errors or None) in ``space``; the keywords are those of
    ``ncp.ncp_errors``. "latent" ignores the NCP-only ones, so a loop passes the same keywords to both."""
    if space == "latent":
        return latent.errors(
            scheduler, x0=x0, noise=noise, timesteps=timesteps, policy_pred=policy_pred, reference_pred=reference_pred
        )
    if space == "ncp":
        missing = [k for k, v in (("encoder", encoder), ("x_t", x_t), ("encoder_hidden_states", encoder_hidden_states)) if v is None]
        if missing:
            raise ValueError(f"space 'ncp' needs {', '.join(missing)}")
        return ncp.ncp_errors(
            encoder, scheduler, x0=x0, x_t=x_t, noise=noise, timesteps=timesteps, policy_pred=policy_pred,
            reference_pred=reference_pred, encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs, config=config, generator=generator,
            variance_noise=variance_noise, t_prime=t_prime, encoder_context=encoder_context,
        )  # fmt: skip
    raise ValueError(f"unknown error space {space!r}; choose one of {SPACES}")
