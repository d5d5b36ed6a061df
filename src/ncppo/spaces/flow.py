"""The rectified-flow process of SD3/SD3.5 and FLUX.1 (``FlowMatchEulerDiscreteScheduler``).

Noise levels t in [0, N) (N = num_train_timesteps, 1000) index the training sigmas as diffusers'
scheduler and training scripts do: u_t = (t + 1) / N, sigma_t = shift(u_t), where

  shift(u) = s u / (1 + (s - 1) u)                      a fixed shift s (SD3.5: 3.0), or
  shift(u) = e^mu / (e^mu + 1/u - 1)                    the resolution-dependent shift of FLUX.1
                                                        (use_dynamic_shifting; "linear": mu / (mu + 1/u - 1))
  mu = base_shift + (max_shift - base_shift) (L - base_len) / (max_len - base_len),
  L = (h / 2) (w / 2) image tokens of the latent (as FluxPipeline's calculate_shift).

So ``model_timesteps`` (1000 sigma_t) equals ``scheduler.timesteps`` at init for a fixed shift.
The process:

  x_t = (1 - sigma_t) x0 + sigma_t eps           target v = eps - x0 (the flow velocity)

NCP (``ncp_step``): the encoder compares x'_pred and x'_true at a level t':
  "t-1"      one Euler step of the flow ODE to the neighbouring training sigma, t' = t - 1
             (sigma_{-1} = 0): x' = x_t + (sigma_t' - sigma_t) v. Deterministic; the target path
             takes the true velocity, x'_true = (1 - sigma_t') x0 + sigma_t' eps. gain sigma_t' - sigma_t.
  "uniform"  x0_hat and eps_hat from the prediction re-noised at a fresh t' (one per pair): for a
             flow this is exactly the Euler step x_t + (sigma_t' - sigma_t) v to sigma_t'.
  "same"     x0_hat = x_t - sigma_t v re-noised at t with the TRUE noise: gain -(1 - sigma_t) sigma_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .process import LevelSampling, NoiseProcess, repeat_pairs


@dataclass(frozen=True)
class FlowMatchProcess(NoiseProcess):
    num_levels: int = 1000
    shift: float = 1.0
    dynamic: bool = False  # FLUX: shift from the image's token count
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    patch_size: int = 2  # latent pixels per token side (SD3 patches, FLUX 2x2 packing)
    sampling: LevelSampling = field(default_factory=lambda: LevelSampling("logit_normal"))

    @classmethod
    def from_scheduler(cls, scheduler, *, sampling: LevelSampling | None = None, shift: float | None = None,
                       patch_size: int = 2) -> "FlowMatchProcess":
        """The process of a FlowMatchEulerDiscreteScheduler's config; ``shift`` (not None) replaces its
        shift by that fixed value (dynamic shifting off)."""
        c = scheduler.config
        process = cls(num_levels=int(c.num_train_timesteps), shift=float(c.get("shift", 1.0)),
                      dynamic=bool(c.get("use_dynamic_shifting", False)),
                      base_shift=float(c.get("base_shift", 0.5) or 0.5), max_shift=float(c.get("max_shift", 1.15) or 1.15),
                      base_image_seq_len=int(c.get("base_image_seq_len", 256)),
                      max_image_seq_len=int(c.get("max_image_seq_len", 4096)),
                      time_shift_type=c.get("time_shift_type", "exponential"), patch_size=patch_size)
        if shift is not None:
            process = replace(process, shift=float(shift), dynamic=False)
        return replace(process, sampling=sampling) if sampling is not None else process

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"flow shift must be > 0, got {self.shift}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be exponential or linear, got {self.time_shift_type!r}")

    # ----- the sigma schedule -------------------------------------------------------------------
    def mu(self, like: torch.Tensor) -> float:
        """The resolution-dependent shift parameter of a latent batch ``like`` (N, C, h, w)."""
        tokens = (like.shape[-2] // self.patch_size) * (like.shape[-1] // self.patch_size)
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return tokens * m + self.base_shift - m * self.base_image_seq_len

    def sigmas(self, levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma of each level (float32, (N,)); level -1 is sigma 0 (the clean end of the path)."""
        u = (levels.to(like.device).float() + 1) / self.num_levels
        if not self.dynamic:
            return self.shift * u / (1 + (self.shift - 1) * u)
        mu = self.mu(like)
        scale = math.exp(mu) if self.time_shift_type == "exponential" else mu
        inverse = torch.where(u > 0, 1 / u.clamp_min(1e-30) - 1, torch.full_like(u, math.inf))
        return scale / (scale + inverse)

    def _column(self, levels, like):
        return self.sigmas(levels, like).view(-1, *([1] * (like.ndim - 1)))

    # ----- the process --------------------------------------------------------------------------
    def add_noise(self, x0, noise, levels):
        sigma = self._column(levels, x0)
        return (1 - sigma) * x0.float() + sigma * noise.float()

    def target(self, x0, noise, levels):
        return noise.float() - x0.float()

    def model_timesteps(self, levels, like):
        return self.sigmas(levels, like) * self.num_levels

    def ncp_draws(self, mode, pairs, like, generator):
        if mode != "uniform":
            return {}  # the Euler step and "same" are deterministic
        device = generator.device if generator is not None else like.device
        t = torch.randint(0, self.num_levels, (pairs,), generator=generator, device=device)
        return {"t_prime": repeat_pairs(t).to(like.device)}

    def ncp_step(self, mode, *, x0, x_t, noise, levels, draws):
        sigma = self._column(levels, x0)
        if mode == "same":
            return levels, x_t.float(), -(1 - sigma) * sigma
        if mode == "t-1":
            t_prime = levels - 1
        elif mode == "uniform":
            t_prime = draws["t_prime"]
        else:
            raise ValueError(f"timestep_mode must be one of ('t-1', 'uniform', 'same'), got {mode!r}")
        sigma_prime = self._column(t_prime, x0)
        target = (1 - sigma_prime) * x0.float() + sigma_prime * noise.float()
        return t_prime, target, sigma_prime - sigma
