"""Latent-space errors: targets by prediction type (read from the scheduler config) and per-sample MSE."""

import pytest
import torch
from diffusers import DDPMScheduler

from ncppo.spaces import compute_errors, latent_errors, prediction_target
from ncppo.tiny import tiny_scheduler, tiny_unet


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    t = torch.tensor([10, 900, 10, 900])
    return x0, noise, t


def test_latent_errors_are_per_sample_means_over_chw():
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.zeros(2, 4, 2, 2)
    target[0] = 1.0  # all 16 elements off by 1: 16 / 16 = 1
    target[1, 0] = 2.0  # 4 elements off by 2: 16 ...
    target[1, 1, 0, 0] = 4.0  # ... plus 1 element off by 4: 16; (16 + 16) / 16 = 2
    assert latent_errors(pred, target).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="shape"):
        latent_errors(pred, target[:1])


def test_targets_by_prediction_type():
    x0, noise, t = _batch()
    abar = tiny_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    assert prediction_target(tiny_scheduler("epsilon"), x0, noise, t) is noise
    assert prediction_target(tiny_scheduler("sample"), x0, noise, t) is x0
    v = prediction_target(tiny_scheduler("v_prediction"), x0, noise, t)
    torch.testing.assert_close(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0)
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(DDPMScheduler(prediction_type="flow"), x0, noise, t)


def test_prediction_type_is_read_from_a_saved_scheduler_config(tiny_sd_v_path):
    scheduler = DDPMScheduler.from_pretrained(tiny_sd_v_path, subfolder="scheduler")
    x0, noise, t = _batch()
    pred = torch.zeros_like(x0)
    policy, reference = compute_errors("latent", scheduler=scheduler, x0=x0, noise=noise, timesteps=t, policy_pred=pred)
    assert reference is None
    v = scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(policy, v.pow(2).mean(dim=(1, 2, 3)))


def test_compute_errors_latent_with_a_real_unet():
    unet = tiny_unet().eval()
    scheduler = tiny_scheduler()
    x0, noise, t = _batch(1)
    x_t = scheduler.add_noise(x0, noise, t)
    cond = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pred = unet(x_t, t, cond).sample
    ref = pred + 0.1
    policy, reference = compute_errors(
        "latent", scheduler=scheduler, x0=x0, noise=noise, timesteps=t, policy_pred=pred, reference_pred=ref,
        encoder=unet, x_t=x_t, encoder_hidden_states=cond,  # NCP-only keywords are accepted and unused
    )  # fmt: skip
    manual = [((pred[i] - noise[i]) ** 2).mean().item() for i in range(4)]
    assert policy.tolist() == pytest.approx(manual, rel=1e-6)
    assert reference.tolist() == pytest.approx([((ref[i] - noise[i]) ** 2).mean().item() for i in range(4)], rel=1e-6)
    assert policy.shape == (4,) and policy.dtype == torch.float32


def test_compute_errors_refuses_unknown_space_and_missing_ncp_inputs():
    x0, noise, t = _batch()
    kw = dict(scheduler=tiny_scheduler(), x0=x0, noise=noise, timesteps=t, policy_pred=noise)
    with pytest.raises(ValueError, match="unknown error space"):
        compute_errors("pixel", **kw)
    with pytest.raises(ValueError, match="encoder"):
        compute_errors("ncp", **kw)
