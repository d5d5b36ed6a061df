"""One preference step: a batch of pairs -> per-sample errors -> loss and metrics.

Family-agnostic: everything model-specific goes through the `ModelAdapter`. Random draws come
from the generator the loop passes in, so a step is reproducible from (seed, step).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from ..models import ModelAdapter
from ..objectives import NEEDS_REFERENCE, BetaScale, LossOutput, preference_loss
from ..spaces import compute_errors
from ..spaces.ncp import NCPConfig


@dataclass
class Reference:
    """The frozen side of a step: the reference denoiser (U-Net or DiT) and how to make it frozen.

    With LoRA, `unet` is the trained network itself and `context` disables its adapters; with a
    full fine-tune, `unet` is a separate frozen copy and `context` is None. The same frozen
    network is the NCP encoder; with `--reference-lora` the reference is a frozen second adapter
    (`context` makes it the only active one) and `encoder_context` keeps the encoder the bare base.
    """

    unet: torch.nn.Module
    context: Callable[[], object] | None = None
    encoder_context: Callable[[], object] | None = None  # the NCP encoder's, when not the reference's

    def frozen(self):
        return self.context() if self.context else nullcontext()

    @property
    def encoder(self) -> Callable[[], object] | None:
        """How the network runs as the frozen NCP encoder (the bare base with LoRA)."""
        return self.encoder_context or self.context


def pair_batch_latents(adapter: ModelAdapter, batch: dict) -> torch.Tensor:
    """Latents x0 of a batch, (2B, C, h, w): winners then losers (from the cache or the VAE)."""
    if "latents" in batch:
        lat = batch["latents"]
    else:
        pix = batch["pixel_values"]
        lat = adapter.encode_images(pix.flatten(0, 1)).unflatten(0, pix.shape[:2])
    return winners_then_losers(lat).to(adapter.device, torch.float32)


def winners_then_losers(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, ...) -> (2B, ...) with all winners first."""
    return torch.cat([x[:, 0], x[:, 1]])


def preference_step(adapter: ModelAdapter, policy: torch.nn.Module, reference: Reference, batch: dict, *,
                    objective: str, space: str, beta: float, cpo_lambda: float, orpo_lambda: float, ncp: NCPConfig,
                    generator: torch.Generator, resolution: int, beta_scale: BetaScale | None = None,
                    process=None, label_smoothing: float = 0.0) -> LossOutput:
    """Loss and metrics of one micro-batch of B pairs (the policy forward keeps the graph).

    `process` is the noise process (``adapter.noise_process(...)``; default the adapter's with its
    default level sampling). With `beta_scale` (--beta-normalize) the objective uses beta / the frozen
    mean reference error (the policy's own, detached, for reference-free objectives); metric
    `beta_effective`. The batch's `labels` (the probability that each pair's first image is
    preferred; none: 1) and `label_smoothing` set the objective's targets."""
    device = adapter.device
    x0 = pair_batch_latents(adapter, batch)
    b = x0.shape[0] // 2

    cond = batch.get("conditioning") or adapter.encode_prompts(batch["captions"])
    cond = cond.repeat(2).to(device)
    dtype = next(reference.unet.parameters()).dtype
    inputs = adapter.denoiser_inputs(cond, winners_then_losers(batch["original_sizes"]),
                                     winners_then_losers(batch["crops_top_left"]), (resolution, resolution),
                                     latents=x0, dtype=dtype)

    # Winner and loser of a pair share the noise and the noise level.
    process = process if process is not None else adapter.noise_process()
    noise = torch.randn((b, *x0.shape[1:]), generator=generator, device=device).repeat(2, 1, 1, 1)
    timesteps = process.sample_levels(b, generator=generator, device=device).repeat(2)
    x_t = process.add_noise(x0, noise, timesteps)

    policy_pred = adapter.predict(policy, x_t.to(dtype), timesteps, inputs, process)
    reference_pred = None
    if objective in NEEDS_REFERENCE:
        with torch.no_grad(), reference.frozen():
            reference_pred = adapter.predict(reference.unet, x_t.to(dtype), timesteps, inputs, process)

    perception = adapter.perception(reference.unet, inputs, ncp, process, reference.encoder) if space == "ncp" else None
    policy_err, reference_err = compute_errors(
        space, process=process, perception=perception, x0=x0, x_t=x_t, noise=noise, timesteps=timesteps,
        policy_pred=policy_pred, reference_pred=reference_pred, config=ncp, generator=generator)
    if beta_scale is not None:
        beta = beta / beta_scale.observe(reference_err if reference_err is not None else policy_err)
    out = preference_loss(policy_err, reference_err, objective=objective, beta=beta, cpo_lambda=cpo_lambda,
                          orpo_lambda=orpo_lambda, labels=batch.get("labels"), label_smoothing=label_smoothing)
    if beta_scale is not None:
        out.metrics["beta_effective"] = torch.as_tensor(beta, dtype=torch.float32, device=out.loss.device).detach()
    return out
