"""Each objective moves the LoRA the way its loss says, in both spaces (not merely "the weights moved").

One small normalised gradient-descent step (first order, whatever the loss's scale) of the real
training step on one fixed batch (fixed noise and timesteps), then the same step's errors: reference-based objectives raise h = (ref_w - ref_l) - (pol_w - pol_l), CPO lowers
pol_w - pol_l, SFT and ORPO lower pol_w. An objective with its sign flipped fails here.
"""

import pytest
import torch
from peft import LoraConfig

from ncppo.lora import adapters_disabled
from ncppo.spaces import NCPConfig
from ncppo.train.step import Reference, preference_step


@pytest.fixture(scope="module")
def adapter(tiny_sd_path):
    from ncppo.models import load_model

    return load_model(str(tiny_sd_path))


def fresh_lora(adapter):
    """The adapter's denoiser with a new rank-4 LoRA on its family's default targets (seeded draw)."""
    net = adapter.unet
    if getattr(net, "peft_config", None):
        net.delete_adapters("default")
    torch.manual_seed(0)
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                               target_modules=list(adapter.default_lora_targets)))
    return net


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    b = 3
    return dict(latents=torch.randn(b, 2, 4, 4, 4, generator=g), captions=["a red circle", "a blue square", "a cat"],
                original_sizes=torch.full((b, 2, 2), 32), crops_top_left=torch.zeros(b, 2, 2, dtype=torch.long))


def run(adapter, unet, objective, space):
    return preference_step(adapter, unet, Reference(unet, lambda: adapters_disabled(unet)), fixed_batch(),
                           objective=objective, space=space, beta=2500.0 if space == "latent" else 1e6,
                           cpo_lambda=0.5, orpo_lambda=0.1, ncp=NCPConfig(),
                           generator=torch.Generator().manual_seed(0), resolution=32)  # fmt: skip


def errors_of(out):
    m = {k: v.item() for k, v in out.metrics.items()}
    return m["policy_err_w"], m["policy_err_l"], m.get("ref_err_w"), m.get("ref_err_l")


@pytest.mark.parametrize("space", ["latent", "ncp"])
@pytest.mark.parametrize("objective", ["dpo", "hinge", "ipo", "cpo", "sft", "orpo"])
def test_training_moves_errors_the_way_the_objective_says(adapter, objective, space):
    unet = fresh_lora(adapter)
    params = [p for p in unet.parameters() if p.requires_grad]
    with torch.no_grad():
        before = errors_of(run(adapter, unet, objective, space))
    grads = torch.autograd.grad(run(adapter, unet, objective, space).loss, params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 1e-2 * g / norm
    with torch.no_grad():
        after = errors_of(run(adapter, unet, objective, space))

    pol_w0, pol_l0, ref_w0, ref_l0 = before
    pol_w1, pol_l1, ref_w1, ref_l1 = after
    assert (ref_w1, ref_l1) == (ref_w0, ref_l0)  # the reference never moves
    if objective in ("dpo", "hinge", "ipo"):
        h0, h1 = (ref_w0 - ref_l0) - (pol_w0 - pol_l0), (ref_w1 - ref_l1) - (pol_w1 - pol_l1)
        assert h0 == 0.0 and h1 > 0, (h0, h1)  # LoRA starts at zero: policy == reference
    elif objective == "cpo":
        assert pol_w1 - pol_l1 < pol_w0 - pol_l0
    else:  # sft, orpo: the winner's error goes down
        assert pol_w1 < pol_w0
