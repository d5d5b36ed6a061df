"""NCP errors on tiny real diffusers U-Nets: the posterior step against DDPMScheduler.step, encoder
features against forward hooks, exact zeros, gradients through the frozen encoder, checkpointing."""

from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig

from ncppo.lora import adapters_disabled
from ncppo.spaces import NCPConfig, encoder_features, ncp_errors
from ncppo.spaces.ncp import ncp_inputs, posterior_step
from ncppo.tiny import tiny_scheduler, tiny_unet

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_unet(seed=0, dtype=torch.float32):
    """A tiny SD-like U-Net with LoRA attached the way training attaches it; lora_B is randomised so the
    adapters change the network (peft initialises B to 0)."""
    unet = tiny_unet(seed)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=g)
    return unet if dtype == torch.float32 else unet.to(dtype)


def batch(t, seed=0, sdxl=False, dtype=torch.float32, prediction_type="epsilon"):
    """Two pairs (winners then losers) sharing noise and timestep per pair."""
    g = torch.Generator().manual_seed(seed)
    scheduler = tiny_scheduler(prediction_type)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    t = torch.as_tensor(t).long()
    t = (t.expand(2) if t.ndim == 0 else t).repeat(2)
    x_t = scheduler.add_noise(x0, noise, t)
    cond = torch.randn(4, 5, 32, generator=g)
    added = None
    if sdxl:
        added = {"text_embeds": torch.randn(4, 16, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 4)}
    cast = lambda x: x.to(dtype)  # noqa: E731
    return dict(
        scheduler=scheduler, x0=cast(x0), noise=cast(noise), timesteps=t, x_t=cast(x_t), encoder_hidden_states=cast(cond),
        added_cond_kwargs=None if added is None else {k: cast(v) for k, v in added.items()},
    )  # fmt: skip


def predictions(unet, b):
    kw = dict(encoder_hidden_states=b["encoder_hidden_states"], added_cond_kwargs=b["added_cond_kwargs"])
    policy = unet(b["x_t"], b["timesteps"], **kw).sample
    with adapters_disabled(unet), torch.no_grad():
        reference = unet(b["x_t"], b["timesteps"], **kw).sample
    return policy, reference


def errors(unet, b, policy, reference=None, **kw):
    b = dict(b)
    return ncp_errors(unet, b.pop("scheduler"), policy_pred=policy, reference_pred=reference, **b, **kw)


# ---------------------------------------------------------------- the posterior step


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t", [1, 500, 999])
def test_posterior_step_equals_ddpm_scheduler_step(prediction_type, t):
    b = batch(t, prediction_type=prediction_type)
    scheduler, x_t = b["scheduler"], b["x_t"]
    model_output = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
    expected = scheduler.step(model_output, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))  # what step() draws
    ours = posterior_step(scheduler, model_output, x_t, b["timesteps"], z)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_posterior_step_batched_over_mixed_timesteps_and_identity_at_zero():
    b = batch(torch.tensor([1, 500]), prediction_type="v_prediction")
    t = torch.tensor([1, 500, 999, 0])
    scheduler, x_t = b["scheduler"], b["x_t"]
    model_output = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
    z = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(10 + i)) for i in range(4)])
    ours = posterior_step(scheduler, model_output, x_t, t, z)
    for i in range(3):
        gen = torch.Generator().manual_seed(10 + i)
        expected = scheduler.step(model_output[i : i + 1], int(t[i]), x_t[i : i + 1], generator=gen).prev_sample
        torch.testing.assert_close(ours[i : i + 1], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[3], x_t[3])  # t' = max(t - 1, 0): t = 0 is the identity


def test_clipping_schedulers_are_refused():
    from diffusers import DDPMScheduler

    b = batch(5)
    with pytest.raises(ValueError, match="clip_sample=False"):
        posterior_step(DDPMScheduler(), b["noise"], b["x_t"], b["timesteps"], b["noise"])


# ---------------------------------------------------------------- encoder features


def hooked_forward(unet, b):
    """conv_in, every down block and the mid block outputs of an ordinary full forward."""
    seen = {}
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: seen.__setitem__("conv_in", o))]
    for k, block in enumerate(unet.down_blocks):
        hooks.append(block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"down{k}", o[0])))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o)))
    with torch.no_grad():
        unet(b["x_t"], b["timesteps"], b["encoder_hidden_states"], added_cond_kwargs=b["added_cond_kwargs"])
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15-like", "sdxl-like"])
def test_encoder_features_equal_hooked_block_outputs(sdxl):
    unet = tiny_unet(sdxl=sdxl).eval()
    b = batch(torch.tensor([3, 700]), sdxl=sdxl)
    seen = hooked_forward(unet, b)
    args = (unet, b["x_t"], b["timesteps"], b["encoder_hidden_states"], b["added_cond_kwargs"])
    with torch.no_grad():
        (down,) = encoder_features(*args, layers="down")
        (mid,) = encoder_features(*args, layers="mid")
        multi = encoder_features(*args, layers="multi")
    assert torch.equal(down, seen["down1"])
    assert torch.equal(mid, seen["mid"])
    assert len(multi) == 3
    for got, key in zip(multi, ["conv_in", "down0", "down1"]):
        assert torch.equal(got, seen[key]), key
    if sdxl:  # the text_time embedding is used: other time ids give other features
        b["added_cond_kwargs"]["time_ids"] = b["added_cond_kwargs"]["time_ids"] * 2
        with torch.no_grad():
            assert not torch.equal(encoder_features(*args, layers="down")[0], down)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("layers", ["down", "mid", "multi"])
def test_t_minus_1_error_is_exactly_zero_at_t0_and_positive_otherwise(layers):
    # Not forced by the code: at t = 0 the step's gain is 0, so every input equals the target's and the
    # separate encoder calls of one batch shape give bit-equal features.
    unet = tiny_unet().eval().requires_grad_(False)
    b = batch(torch.tensor([0, 400]))
    wrong = torch.randn(b["x_t"].shape, generator=torch.Generator().manual_seed(5))
    policy, reference = errors(unet, b, wrong, wrong + 0.5, config=NCPConfig("t-1", layers), generator=torch.Generator().manual_seed(0))
    assert policy[[0, 2]].tolist() == [0.0, 0.0] and reference[[0, 2]].tolist() == [0.0, 0.0]
    assert (policy[[1, 3]] > 1e-6).all() and (reference[[1, 3]] > policy[[1, 3]]).all()


@pytest.mark.parametrize("mode", ["t-1", "uniform", "same"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_perfect_prediction_has_zero_error_in_every_mode(mode, prediction_type):
    unet = tiny_unet().eval().requires_grad_(False)
    b = batch(torch.tensor([250, 800]), prediction_type=prediction_type)
    from ncppo.spaces import prediction_target

    perfect = prediction_target(b["scheduler"], b["x0"], b["noise"], b["timesteps"])
    policy, _ = errors(unet, b, perfect, config=NCPConfig(mode, "multi"), generator=torch.Generator().manual_seed(0))
    assert policy.abs().max().item() <= 1e-10
    wrong, _ = errors(unet, b, perfect + 0.3, config=NCPConfig(mode, "multi"), generator=torch.Generator().manual_seed(0))
    assert (wrong > 0).all()


def test_uniform_and_same_inputs_by_hand():
    b = batch(torch.tensor([100, 600]))
    scheduler, x_t, noise, t = b["scheduler"], b["x_t"], b["noise"], b["timesteps"]
    eps_hat = noise + 0.2 * torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
    abar = scheduler.alphas_cumprod
    col = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    x0_hat = (x_t - col((1 - abar[t]).sqrt()) * eps_hat) / col(abar[t].sqrt())
    t_prime = torch.tensor([900, 20, 900, 20])
    _, (x_pol,), target = ncp_inputs(scheduler, "uniform", x0=b["x0"], x_t=x_t, noise=noise, timesteps=t,
                                     predictions=[eps_hat], t_prime=t_prime)  # fmt: skip
    torch.testing.assert_close(x_pol, col(abar[t_prime].sqrt()) * x0_hat + col((1 - abar[t_prime]).sqrt()) * eps_hat)
    torch.testing.assert_close(target, col(abar[t_prime].sqrt()) * b["x0"] + col((1 - abar[t_prime]).sqrt()) * noise)
    # "same": x0_hat re-noised at t with the true noise = x_t + sqrt(1 - abar_t) (eps - eps_hat); target = x_t
    t_same, (x_pol,), target = ncp_inputs(scheduler, "same", x0=b["x0"], x_t=x_t, noise=noise, timesteps=t,
                                          predictions=[eps_hat])  # fmt: skip
    assert torch.equal(t_same, t)
    torch.testing.assert_close(x_pol, x_t + col((1 - abar[t]).sqrt()) * (noise - eps_hat), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target, x_t, rtol=1e-5, atol=1e-5)


def test_random_draws_are_reproducible_and_can_be_passed_explicitly():
    unet = tiny_unet().eval().requires_grad_(False)
    b = batch(torch.tensor([100, 600]))
    wrong = b["noise"] + 0.3 * torch.randn(b["x_t"].shape, generator=torch.Generator().manual_seed(1))
    for mode in ("t-1", "uniform"):
        config = NCPConfig(mode)
        first, _ = errors(unet, b, wrong, config=config, generator=torch.Generator().manual_seed(4))
        again, _ = errors(unet, b, wrong, config=config, generator=torch.Generator().manual_seed(4))
        other, _ = errors(unet, b, wrong, config=config, generator=torch.Generator().manual_seed(5))
        assert torch.equal(first, again) and not torch.equal(first, other)
        g = torch.Generator().manual_seed(4)  # the documented draw: one per pair, repeated for the losers
        if mode == "t-1":
            z = torch.randn((2, 4, 8, 8), generator=g)
            explicit, _ = errors(unet, b, wrong, config=config, variance_noise=torch.cat([z, z]))
        else:
            tp = torch.randint(0, 1000, (2,), generator=g)
            explicit, _ = errors(unet, b, wrong, config=config, t_prime=torch.cat([tp, tp]))
        assert torch.equal(first, explicit)


def test_multi_layer_error_by_hand():
    unet = tiny_unet().eval().requires_grad_(False)
    b = batch(torch.tensor([100, 600]))
    wrong = b["noise"] + 0.3 * torch.randn(b["x_t"].shape, generator=torch.Generator().manual_seed(1))
    tp = torch.tensor([300, 50, 300, 50])
    policy, _ = errors(unet, b, wrong, config=NCPConfig("uniform", "multi"), t_prime=tp)
    _, (x_pol,), target = ncp_inputs(b["scheduler"], "uniform", x0=b["x0"], x_t=b["x_t"], noise=b["noise"],
                                     timesteps=b["timesteps"], predictions=[wrong], t_prime=tp)  # fmt: skip
    with torch.no_grad():
        fp = encoder_features(unet, x_pol, tp, b["encoder_hidden_states"], layers="multi")
        ft = encoder_features(unet, target, tp, b["encoder_hidden_states"], layers="multi")
    by_hand = sum(((p - q) ** 2).mean(dim=(1, 2, 3)) / q.var() for p, q in zip(fp, ft)) / 3
    torch.testing.assert_close(policy, by_hand, rtol=1e-5, atol=1e-8)


def test_sdxl_like_unet_with_added_conditioning():
    unet = tiny_unet(sdxl=True).eval().requires_grad_(False)
    b = batch(torch.tensor([0, 300]), sdxl=True)
    wrong = b["noise"] + 0.3
    policy, reference = errors(unet, b, wrong, wrong - 0.3, generator=torch.Generator().manual_seed(0))
    assert policy[[0, 2]].tolist() == [0.0, 0.0] and (policy[[1, 3]] > 0).all()
    assert reference.abs().max() <= 1e-10  # the reference is the perfect prediction here


# ---------------------------------------------------------------- gradients and LoRA


def lora_names(unet):
    return {n for n, _ in unet.named_parameters() if "lora_" in n}


def step_grads(unet, b, **kw):
    unet.zero_grad(set_to_none=True)
    policy, reference = predictions(unet, b)
    pol_err, ref_err = errors(unet, b, policy, reference, generator=torch.Generator().manual_seed(0), **kw)
    from ncppo.objectives import preference_loss

    preference_loss(pol_err, ref_err, objective="dpo", beta=1e4).loss.backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_only_lora_weights_get_gradients_and_encoder_weights_stay_bit_identical():
    unet = lora_unet()
    b = batch(torch.tensor([300, 700]))
    frozen_before = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}
    requires_grad_before = {n: p.requires_grad for n, p in unet.named_parameters()}
    grads = step_grads(unet, b)
    assert set(grads) == lora_names(unet)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == requires_grad_before
    # an optimizer over ALL parameters (weight decay too) must still leave the frozen ones untouched
    lora_before = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}
    torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=0.1).step()
    for n, p in unet.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
        else:
            assert not torch.equal(p, lora_before[n]), n


def test_policy_gradient_flows_through_the_frozen_encoder():
    unet = tiny_unet().eval().requires_grad_(False)
    b = batch(torch.tensor([300, 700]))
    pred = (b["noise"] + 0.3).requires_grad_(True)
    policy, _ = errors(unet, b, pred, generator=torch.Generator().manual_seed(0))
    policy.sum().backward()
    assert pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())


def test_an_unfrozen_encoder_is_refused():
    unet = tiny_unet()  # requires_grad=True everywhere
    b = batch(torch.tensor([300, 700]))
    with pytest.raises(ValueError, match="must be frozen"):
        errors(unet, b, b["noise"] + 0.3)


@pytest.mark.parametrize("precision", ["native", "scaled"])  # the autograd pass: the policy's / the target's
@pytest.mark.parametrize("layers", ["down", "multi"])
def test_checkpointed_encoder_gives_the_same_gradients(layers, precision):
    unet = lora_unet()
    b = batch(torch.tensor([300, 700]))
    plain = step_grads(unet, b, config=NCPConfig(layers=layers, precision=precision))
    checkpointed = step_grads(unet, b, config=NCPConfig(layers=layers, checkpoint_encoder=True, precision=precision))
    unet.enable_gradient_checkpointing()  # diffusers' own block checkpointing must not leak into the encoder pass
    blocks = step_grads(unet, b, config=NCPConfig(layers=layers, precision=precision))
    both = step_grads(unet, b, config=NCPConfig(layers=layers, checkpoint_encoder=True, precision=precision))
    assert set(plain) == set(checkpointed) == set(blocks) == set(both) == lora_names(unet)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(blocks[n], plain[n], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(both[n], plain[n], rtol=1e-5, atol=1e-8)


def test_checkpointed_encoder_keeps_fewer_activations():
    unet = lora_unet()
    b = batch(torch.tensor([300, 700]))
    policy, reference = predictions(unet, b)
    params = {id(p) for p in unet.parameters()}

    def saved_bytes(checkpoint_encoder):  # activations autograd keeps for backward during the NCP pass
        kept = {}

        def pack(t):
            base = t if t._base is None else t._base
            if id(base) not in params:
                kept[id(base)] = base.numel() * base.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            errors(unet, b, policy, reference, config=NCPConfig(checkpoint_encoder=checkpoint_encoder))
        return sum(kept.values())

    assert saved_bytes(True) < 0.4 * saved_bytes(False)


def test_a_recompute_with_the_adapters_enabled_would_be_caught(monkeypatch):
    """Control for the gradient test above, through the real code path: plant the bug it guards against
    (the block recompute, which runs in backward after the adapters are enabled again, no longer
    disables them itself): torch refuses the recompute or the gradients change."""
    import ncppo.spaces.ncp as ncp_module
    from torch.utils.checkpoint import CheckpointError

    unet = lora_unet()
    b = batch(torch.tensor([300, 700]))
    plain = step_grads(unet, b, config=NCPConfig())
    real = ncp_module._recompute_under
    monkeypatch.setattr(ncp_module, "_recompute_under", lambda context_of: real(lambda module: nullcontext()))
    try:
        buggy = step_grads(unet, b, config=NCPConfig(checkpoint_encoder=True))
    except CheckpointError:
        return
    assert any(not torch.allclose(buggy[n], plain[n], rtol=1e-3, atol=0) for n in plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_and_bf16_run_on_cpu(dtype):
    unet = lora_unet(dtype=dtype)
    b = batch(torch.tensor([0, 500]), dtype=dtype)
    for checkpoint_encoder in (False, True):
        grads = step_grads(unet, b, config=NCPConfig(checkpoint_encoder=checkpoint_encoder))
        assert set(grads) == lora_names(unet)
        assert all(torch.isfinite(g).all() and g.dtype == dtype for g in grads.values())
    policy, reference = predictions(unet, b)
    pol_err, ref_err = errors(unet, b, policy, reference, generator=torch.Generator().manual_seed(0))
    assert pol_err.dtype == torch.float32 and torch.isfinite(pol_err).all()
    assert pol_err[[0, 2]].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- adapters_disabled


def test_adapters_disabled_nests_restores_and_is_a_no_op_without_adapters():
    unet = lora_unet()
    b = batch(torch.tensor([300, 700]))
    run = lambda: unet(b["x_t"], b["timesteps"], b["encoder_hidden_states"]).sample.detach()  # noqa: E731
    with_lora = run()
    base = tiny_unet()(b["x_t"], b["timesteps"], b["encoder_hidden_states"]).sample.detach()
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    with adapters_disabled(unet):
        torch.testing.assert_close(run(), base)
        with adapters_disabled(unet):
            torch.testing.assert_close(run(), base)
        torch.testing.assert_close(run(), base)  # the inner exit kept the outer state
    assert torch.equal(run(), with_lora) and not torch.allclose(with_lora, base)
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    plain = tiny_unet()
    with adapters_disabled(plain):
        assert torch.equal(plain(b["x_t"], b["timesteps"], b["encoder_hidden_states"]).sample.detach(), base)


def test_adapters_disabled_on_a_peft_model():
    from peft import get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    base = net(x).detach()
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights="gaussian"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    assert not torch.allclose(model(x), base)
    with adapters_disabled(model):
        torch.testing.assert_close(model(x), base)
    assert not torch.allclose(model(x), base)


def test_the_library_use_snippet_runs():
    """docs/library.md's training step, executed on a tiny LoRA U-Net."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "library.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    unet = lora_unet()
    b = batch(torch.tensor([300, 700]))
    gen = torch.Generator().manual_seed(0)
    scope = dict(unet=unet, scheduler=b["scheduler"], x0=b["x0"], cond=b["encoder_hidden_states"], added=None, B=2, gen=gen)
    exec(snippet, scope)
    assert torch.isfinite(scope["out"].loss) and set(scope["out"].metrics) >= {"implicit_acc", "reward_margin"}
    assert all(p.grad is not None for n, p in unet.named_parameters() if "lora_" in n)
