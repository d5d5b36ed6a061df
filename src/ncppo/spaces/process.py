"""Noise processes: how x_t is made from x0, what a perfect denoiser predicts, and where NCP looks.

A process works on integer noise levels t in [0, N), larger t = more noise, shared by a pair.
Two are built in:

  DDPMProcess       SD1.x/2.x and SDXL: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps,
                    v or x0 (the scheduler's prediction_type); t is the U-Net's timestep.
  FlowMatchProcess  SD3/SD3.5 and FLUX (``ncppo.spaces.flow``): x_t = (1 - sigma_t) x0 + sigma_t eps,
                    target the velocity eps - x0; the denoiser's timestep is 1000 sigma_t.

Every process offers the NCP step (``ncp_step``): the noise level t' the frozen encoder looks at,
x'_true there (the target path), and the per-sample gain g with x'_pred - x'_true = g (pred - target),
every mode's x' being affine in the prediction. So ``ncppo.spaces`` never asks which family it
serves. Levels are drawn by ``sample_levels`` with a density over u in [0, 1) (``TIMESTEP_SAMPLING``:
"uniform"; "logit_normal", u = sigmoid(n), n ~ N(mean, std), the SD3 paper's default with mean 0,
std 1; "mode", the SD3 paper's mode sampling with scale 1.29), level = floor(u N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")


@dataclass(frozen=True)
class LevelSampling:
    """How training noise levels are drawn: ``scheme`` in TIMESTEP_SAMPLING and its parameters."""

    scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        if self.scheme not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLING}, got {self.scheme!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")

    def draw(self, n: int, levels: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """n levels in [0, levels) (long). "uniform" is one ``torch.randint`` draw, as in Diffusion-DPO."""
        if self.scheme == "uniform":
            return torch.randint(0, levels, (n,), generator=generator, device=device)
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.scheme, n, logit_mean=self.logit_mean, logit_std=self.logit_std,
                                                  mode_scale=self.mode_scale, device=device, generator=generator)
        return (u * levels).long().clamp(0, levels - 1)


def repeat_pairs(x: torch.Tensor) -> torch.Tensor:
    """A pair's draw for its winner and its loser: x (B, ...) -> (2B, ...)."""
    return torch.cat([x, x])


class NoiseProcess:
    """What ``ncppo.spaces`` and the training step need of a noise process (see the module doc)."""

    num_levels: int = 1000
    sampling: LevelSampling = LevelSampling()

    def sample_levels(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """n training levels (long), drawn with ``self.sampling``."""
        return self.sampling.draw(n, self.num_levels, generator, device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """What a perfect denoiser predicts at x_t = add_noise(x0, noise, levels)."""
        raise NotImplementedError

    def model_timesteps(self, levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The timestep the denoiser is called with at ``levels`` (as the pipeline's scheduler gives it)."""
        raise NotImplementedError

    # ----- NCP --------------------------------------------------------------------------------
    def ncp_draws(self, mode: str, pairs: int, like: torch.Tensor, generator: torch.Generator | None) -> dict:
        """The random draws of an NCP ``mode`` for 2 * pairs samples (one per pair, repeated for the losers)."""
        raise NotImplementedError

    def ncp_step(self, mode: str, *, x0, x_t, noise, levels, draws: dict):
        """(t', x'_true float32, gain (N, 1, ..) float32): where the encoder looks, the target's input
        there, and g with x'_pred - x'_true = g * (prediction - target)."""
        raise NotImplementedError


class DDPMProcess(NoiseProcess):
    """The DDPM forward process of a ``DDPMScheduler`` (its alphas_cumprod and prediction_type); NCP steps
    as ``ncppo.spaces.ncp`` defines them (posterior step to t - 1, re-noising at t' or at t)."""

    def __init__(self, scheduler, sampling: LevelSampling | None = None):
        self.scheduler = scheduler
        self.num_levels = int(scheduler.config.num_train_timesteps)
        self.sampling = sampling or LevelSampling()

    def add_noise(self, x0, noise, levels):
        return self.scheduler.add_noise(x0, noise, levels)

    def target(self, x0, noise, levels):
        from .latent import prediction_target

        return prediction_target(self.scheduler, x0, noise, levels)

    def model_timesteps(self, levels, like):
        return levels

    def ncp_draws(self, mode, pairs, like, generator):
        device = generator.device if generator is not None else like.device
        if mode == "t-1":
            z = torch.randn((pairs, *like.shape[1:]), generator=generator, device=device)
            return {"variance_noise": repeat_pairs(z).to(like.device)}
        if mode == "uniform":
            t = torch.randint(0, self.num_levels, (pairs,), generator=generator, device=device)
            return {"t_prime": repeat_pairs(t).to(like.device)}
        return {}

    def ncp_step(self, mode, *, x0, x_t, noise, levels, draws):
        from .ncp import ncp_gain, ncp_target

        t_prime, target = ncp_target(self.scheduler, mode, x0=x0, x_t=x_t, noise=noise, timesteps=levels,
                                     variance_noise=draws.get("variance_noise"), t_prime=draws.get("t_prime"))
        gain = ncp_gain(self.scheduler, mode, levels, t_prime, target)
        return t_prime, target, gain


def as_process(scheduler_or_process, sampling: LevelSampling | None = None) -> NoiseProcess:
    """A ``NoiseProcess`` as it is, or the process of a diffusers training scheduler: a
    FlowMatchEulerDiscreteScheduler (SD3/FLUX) gives a ``FlowMatchProcess``, a DDPM-style one (with
    ``alphas_cumprod``) a ``DDPMProcess``."""
    if isinstance(scheduler_or_process, NoiseProcess):
        return scheduler_or_process
    if hasattr(scheduler_or_process, "alphas_cumprod"):
        return DDPMProcess(scheduler_or_process, sampling)
    if type(scheduler_or_process).__name__.startswith("FlowMatch"):
        from .flow import FlowMatchProcess

        return FlowMatchProcess.from_scheduler(scheduler_or_process, sampling=sampling)
    raise TypeError(f"no noise process for {type(scheduler_or_process).__name__}: pass a DDPM-style or "
                    "FlowMatchEulerDiscreteScheduler, or an ncppo.spaces.process.NoiseProcess")
