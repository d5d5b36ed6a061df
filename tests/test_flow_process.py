"""The rectified-flow process of SD3/FLUX: sigma schedules against diffusers' scheduler and pipeline,
the noise path and target by hand, level sampling, and the NCP steps (Euler step, re-noising)."""

import math

import pytest
import torch

from ncppo.spaces import compute_errors, latent_errors
from ncppo.spaces.flow import FlowMatchProcess
from ncppo.spaces.process import DDPMProcess, LevelSampling, as_process
from ncppo.tiny import tiny_flow_scheduler, tiny_scheduler

pytestmark = pytest.mark.usefixtures("single_thread")


def test_fixed_shift_sigmas_are_the_schedulers_training_timesteps():
    scheduler = tiny_flow_scheduler()  # SD3.5: shift 3
    process = as_process(scheduler)
    assert isinstance(process, FlowMatchProcess) and process.shift == 3.0 and not process.dynamic
    levels = torch.arange(1000)
    like = torch.zeros(1, 16, 16, 16)
    # level t = scheduler index 999 - t (diffusers orders its timesteps from most to least noise)
    assert torch.equal(process.model_timesteps(levels, like), scheduler.timesteps.flip(0))
    u = (levels + 1) / 1000
    torch.testing.assert_close(process.sigmas(levels, like), 3 * u / (1 + 2 * u))
    assert process.sigmas(torch.tensor([-1]), like).item() == 0.0  # the clean end of the path


@pytest.mark.parametrize("side", [16, 64, 128])
def test_flux_shift_depends_on_resolution_as_in_the_pipeline(side):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = tiny_flow_scheduler(dynamic=True)
    process = as_process(scheduler)
    like = torch.zeros(1, 16, side, side)
    tokens = (side // 2) ** 2  # 2x2-packed latent tokens
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert process.mu(like) == pytest.approx(mu)
    # the pipeline's sampling sigmas at 10 steps: set_timesteps(sigmas=linspace(1, 1/10), mu)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.1, 10).numpy(), mu=mu)
    levels = torch.arange(999, -1, -100)  # u = 1.0, 0.9, ..., 0.1
    torch.testing.assert_close(process.sigmas(levels, like), scheduler.sigmas[:10].float(), rtol=1e-5, atol=1e-6)
    u = (levels + 1) / 1000
    torch.testing.assert_close(process.sigmas(levels, like), math.exp(mu) / (math.exp(mu) + 1 / u - 1))


def test_flux_shift_reads_the_sequence_lengths_and_shifts_from_the_scheduler_config():
    """mu = base_shift + (max_shift - base_shift) (L - base_image_seq_len) / (max_image_seq_len - base_image_seq_len)
    with every constant from the config (docs/library.md), not fixed at 256 / 4096."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.3, max_shift=0.9,
                                                base_image_seq_len=64, max_image_seq_len=1024)
    process = as_process(scheduler)
    like = torch.zeros(1, 16, 32, 32)  # L = 16 x 16 = 256 tokens
    assert process.mu(like) == pytest.approx(0.3 + 0.6 * (256 - 64) / (1024 - 64))  # 0.42
    assert process.mu(like) == pytest.approx(calculate_shift(256, 64, 1024, 0.3, 0.9))
    assert process.mu(like) != pytest.approx(calculate_shift(256, 256, 4096, 0.5, 1.15))


def test_flow_shift_override_fixes_the_shift():
    process = FlowMatchProcess.from_scheduler(tiny_flow_scheduler(dynamic=True), shift=1.0)
    assert not process.dynamic and process.shift == 1.0
    levels = torch.tensor([0, 499, 999])
    torch.testing.assert_close(process.sigmas(levels, torch.zeros(1, 16, 8, 8)), (levels + 1) / 1000)


def test_noise_path_and_velocity_target_by_hand():
    process = as_process(tiny_flow_scheduler())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    levels = torch.tensor([0, 250, 700, 999])
    sigma = process.sigmas(levels, x0).view(-1, 1, 1, 1)
    torch.testing.assert_close(process.add_noise(x0, noise, levels), (1 - sigma) * x0 + sigma * noise)
    assert torch.equal(process.target(x0, noise, levels), noise - x0)
    # the latent-space error of a velocity prediction, through the library entry point
    pred = noise - x0 + 0.1
    pol, ref = compute_errors("latent", scheduler=tiny_flow_scheduler(), x0=x0, noise=noise, timesteps=levels,
                              policy_pred=pred, reference_pred=noise - x0)
    torch.testing.assert_close(pol, torch.full((4,), 0.01))
    assert ref.abs().max() == 0
    torch.testing.assert_close(pol, latent_errors(pred, noise - x0))


def test_level_sampling_schemes():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    uniform = LevelSampling("uniform").draw(5, 1000, gen(), "cpu")
    assert torch.equal(uniform, torch.randint(0, 1000, (5,), generator=gen()))  # Diffusion-DPO's draw, unchanged
    logit = LevelSampling("logit_normal").draw(20000, 1000, gen(), "cpu").float()
    assert 0 <= logit.min() and logit.max() <= 999
    assert logit.mean().item() == pytest.approx(499.5, abs=5)  # symmetric around the middle
    # logit-normal(0, 1) puts 1.4% of u below 0.1 (Phi(logit(0.1)) = Phi(-2.197)); uniform 10%
    assert (logit < 100).float().mean().item() == pytest.approx(0.014, abs=0.01)
    mode = LevelSampling("mode", mode_scale=1.29).draw(20000, 1000, gen(), "cpu").float()
    assert (mode < 100).float().mean().item() < 0.1 and (mode > 899).float().mean().item() < 0.1
    with pytest.raises(ValueError, match="timestep sampling must be one of"):
        LevelSampling("cosine")
    # the process draws its levels with its own sampling; DDPM keeps uniform by default
    assert DDPMProcess(tiny_scheduler()).sampling.scheme == "uniform"
    assert as_process(tiny_flow_scheduler()).sampling.scheme == "logit_normal"


def _problem(levels):
    process = as_process(tiny_flow_scheduler())
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    x_t = process.add_noise(x0, noise, levels)
    v_hat = noise - x0 + 0.3 * torch.randn(4, 16, 8, 8, generator=g)
    return process, x0, noise, x_t, v_hat


def test_t_minus_1_is_one_euler_step_to_the_neighbouring_training_sigma():
    levels = torch.tensor([0, 1, 500, 999])
    process, x0, noise, x_t, v_hat = _problem(levels)
    t_prime, target, gain = process.ncp_step("t-1", x0=x0, x_t=x_t, noise=noise, levels=levels, draws={})
    assert t_prime.tolist() == [-1, 0, 499, 998]
    sigma, sigma_prime = (process.sigmas(t, x0).view(-1, 1, 1, 1) for t in (levels, t_prime))
    assert sigma_prime[0].item() == 0.0  # from the lowest training sigma the step goes to the data
    # the target path takes the true velocity: x_t + (s' - s)(eps - x0) = (1 - s') x0 + s' eps
    torch.testing.assert_close(target, x_t + (sigma_prime - sigma) * (noise - x0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target, (1 - sigma_prime) * x0 + sigma_prime * noise)
    # the policy's input is the Euler step with its own velocity; the difference is gain * (v_hat - v)
    x_pred = x_t + (sigma_prime - sigma) * v_hat
    torch.testing.assert_close(gain, sigma_prime - sigma)
    torch.testing.assert_close(target + gain * (v_hat - (noise - x0)), x_pred, rtol=1e-5, atol=1e-6)
    assert (gain < 0).all() and gain.abs().max() < 0.01  # a small step toward the data


def test_uniform_renoising_is_the_euler_step_to_a_fresh_sigma_and_same_uses_the_true_noise():
    levels = torch.tensor([100, 100, 800, 800])
    process, x0, noise, x_t, v_hat = _problem(levels)
    draws = process.ncp_draws("uniform", 2, x_t, torch.Generator().manual_seed(0))
    assert draws["t_prime"][:2].tolist() == draws["t_prime"][2:].tolist()  # shared by a pair
    t_prime, target, gain = process.ncp_step("uniform", x0=x0, x_t=x_t, noise=noise, levels=levels, draws=draws)
    s, sp = (process.sigmas(t, x0).view(-1, 1, 1, 1) for t in (levels, t_prime))
    x0_hat, eps_hat = x_t - s * v_hat, x_t + (1 - s) * v_hat  # what the velocity implies
    renoised = (1 - sp) * x0_hat + sp * eps_hat
    torch.testing.assert_close(target + gain * (v_hat - (noise - x0)), renoised, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(renoised, x_t + (sp - s) * v_hat, rtol=1e-5, atol=1e-5)

    t_same, target, gain = process.ncp_step("same", x0=x0, x_t=x_t, noise=noise, levels=levels, draws={})
    assert torch.equal(t_same, levels) and torch.equal(target, x_t)
    torch.testing.assert_close(target + gain * (v_hat - (noise - x0)), (1 - s) * x0_hat + s * noise,
                               rtol=1e-5, atol=1e-5)
    assert process.ncp_draws("t-1", 2, x_t, None) == {}  # the Euler step is deterministic


@pytest.mark.parametrize("convention,theirs,ours", [("flow-grpo", 100.0, 50.0), ("flow-factory", 2000.0, 1000.0)])
def test_flow_matching_beta_conventions(convention, theirs, ours):
    """flow_grpo / Flow-Factory: -log sigmoid(-0.5 beta ((err_w - ref_w) - (err_l - ref_l))) on velocity errors."""
    import torch.nn.functional as F

    from ncppo.objectives import convert_beta, preference_loss

    assert convert_beta(theirs, convention) == ours
    g = torch.Generator().manual_seed(0)
    pol, ref = 1 + 0.01 * torch.randn(8, generator=g), 1 + 0.01 * torch.randn(8, generator=g)
    (pw, pl), (rw, rl) = pol.chunk(2), ref.chunk(2)
    their_loss = -F.logsigmoid(-0.5 * theirs * ((pw - rw) - (pl - rl))).mean()
    torch.testing.assert_close(preference_loss(pol, ref, objective="dpo", beta=ours).loss, their_loss)
