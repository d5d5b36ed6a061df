"""Each objective against values computed by hand (math module) on fixed errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from ncppo.objectives import BETA_CONVENTIONS, NEEDS_REFERENCE, OBJECTIVES, convert_beta, preference_loss

BETA = 10.0
# winners first: pairs (0.10 vs 0.20) and (0.30 vs 0.25)
POL = torch.tensor([0.10, 0.30, 0.20, 0.25])
REF = torch.tensor([0.15, 0.20, 0.15, 0.30])
# h = (ref_w - ref_l) - (pol_w - pol_l) = [0 + 0.10, -0.10 - 0.05] = [0.10, -0.15]; logits = beta * h
LOGITS = [1.0, -1.5]


def softplus(x):  # -logsigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def log_odds(nll):  # log(p / (1 - p)) for p = exp(-nll)
    return -nll - math.log(1 - math.exp(-nll))


def loss(objective, **kw):
    ref = kw.pop("ref", REF)
    return preference_loss(POL, ref, objective=objective, beta=BETA, **kw)


def test_dpo_by_hand():
    out = loss("dpo")
    expected = (softplus(-1.0) + softplus(1.5)) / 2  # -logsigmoid(z) = softplus(-z)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(1.0073375, rel=1e-6)


def test_hinge_by_hand():
    assert loss("hinge").loss.item() == pytest.approx((0.0 + 2.5) / 2, rel=1e-6)


def test_ipo_by_hand():
    assert loss("ipo").loss.item() == pytest.approx(((1.0 - 0.5) ** 2 + (-1.5 - 0.5) ** 2) / 2, rel=1e-6)


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_cpo_by_hand_ignores_reference(lam):
    # logits -beta * (pol_w - pol_l) = [1.0, -0.5]; lambda * mean(pol_w) = lambda * 0.2
    expected = (softplus(-1.0) + softplus(0.5)) / 2 + lam * 0.2
    assert loss("cpo", cpo_lambda=lam).loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss("cpo", cpo_lambda=lam, ref=None).loss.item() == pytest.approx(expected, rel=1e-6)


def test_sft_by_hand():
    assert loss("sft", ref=None).loss.item() == pytest.approx(0.2, rel=1e-6)


def test_orpo_by_hand():
    # nll = beta * error: winners [1.0, 3.0], losers [2.0, 2.5]
    odds_term = (softplus(-(log_odds(1.0) - log_odds(2.0))) + softplus(-(log_odds(3.0) - log_odds(2.5)))) / 2
    expected = (1.0 + 3.0) / 2 + 0.3 * odds_term
    assert loss("orpo", orpo_lambda=0.3, ref=None).loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_lowering_the_winner_error_lowers_the_loss(objective):
    """The sign check the research code's ORPO failed: d loss / d pol_w > 0, d loss / d pol_l <= 0."""
    pol = torch.tensor([0.10, 0.30, 0.20, 0.25], requires_grad=True)
    # beta 1: no pair saturates hinge or lies past IPO's target, so every gradient is non-zero
    out = preference_loss(pol, REF, objective=objective, beta=1.0)
    out.loss.backward()
    assert (pol.grad[:2] > 0).all(), pol.grad
    if objective == "sft":
        assert (pol.grad[2:] == 0).all()
    else:
        assert (pol.grad[2:] < 0).all(), pol.grad
    with torch.no_grad():
        lowered = pol.detach().clone()
        lowered[0] -= 0.01
        assert preference_loss(lowered, REF, objective=objective, beta=1.0).loss < out.loss


@pytest.mark.parametrize("objective", sorted(NEEDS_REFERENCE))
def test_reference_objectives_refuse_without_reference(objective):
    with pytest.raises(ValueError, match="needs reference_errors"):
        preference_loss(POL, None, objective=objective)


def test_needs_reference_is_exactly_dpo_hinge_ipo():
    assert NEEDS_REFERENCE == {"dpo", "hinge", "ipo"}
    assert set(OBJECTIVES) == {"dpo", "hinge", "ipo", "cpo", "sft", "orpo"}


def test_metrics_by_hand():
    out = loss("dpo")
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["implicit_acc"] == 0.5  # logits [1.0, -1.5]
    assert m["reward_margin"] == pytest.approx((0.10 - 0.15) / 2, rel=1e-5)
    assert m["policy_err_w"] == pytest.approx(0.2) and m["policy_err_l"] == pytest.approx(0.225)
    assert m["ref_err_w"] == pytest.approx(0.175) and m["ref_err_l"] == pytest.approx(0.225)
    assert all(not v.requires_grad for v in out.metrics.values())
    assert "ref_err_w" not in loss("sft", ref=None).metrics


def test_ties_count_half():
    # pair logits: > 0, == 0 (policy = reference exactly), < 0, > 0  ->  (2 + 0.5) / 4
    pol = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.2, 0.2, 0.2])
    ref = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])
    out = preference_loss(pol, ref, objective="dpo", beta=1.0)
    assert out.metrics["implicit_acc"].item() == 0.625
    # without a reference the implicit reward is -beta * (pol_w - pol_l): [+, 0, -, +] as well
    out = preference_loss(torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.2, 0.2, 0.2]), objective="cpo", beta=1.0)
    assert out.metrics["implicit_acc"].item() == 0.625


def test_beta_conversion_matches_official_diffusion_dpo_formula():
    beta_dpo = 5000.0
    model_diff, ref_diff = POL[:2] - POL[2:], REF[:2] - REF[2:]
    official = -F.logsigmoid(-0.5 * beta_dpo * (model_diff - ref_diff)).mean()  # Diffusion-DPO train.py
    ours = preference_loss(POL, REF, objective="dpo", beta=convert_beta(beta_dpo, "diffusion-dpo")).loss
    torch.testing.assert_close(ours, official)
    assert convert_beta(5000, "diffusion-dpo") == 2500.0
    assert convert_beta(5000, "diffusers-sdxl") == 2500.0
    assert convert_beta(2500, "diffusers-sd") == 2500.0
    assert convert_beta(2500, "ncppo") == 2500.0
    assert set(BETA_CONVENTIONS) >= {"ncppo", "diffusion-dpo", "diffusers-sd", "diffusers-sdxl"}
    with pytest.raises(ValueError, match="unknown beta convention"):
        convert_beta(1.0, "trl")


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="winners then losers"):
        preference_loss(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        preference_loss(torch.ones(4), torch.ones(2))
    with pytest.raises(ValueError, match="unknown objective"):
        preference_loss(POL, REF, objective="kto")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(POL, REF, beta=0.0)


def test_bf16_errors_are_computed_in_float32():
    out = preference_loss(POL.bfloat16(), REF.bfloat16(), objective="dpo", beta=BETA)
    assert out.loss.dtype == torch.float32
    ref = preference_loss(POL.bfloat16().float(), REF.bfloat16().float(), objective="dpo", beta=BETA)
    assert out.loss.item() == ref.loss.item()


# ---- soft labels: p = probability that the first image (the winner) is preferred
P = torch.tensor([0.8, 0.6])


def test_soft_label_dpo_by_hand():
    # conservative DPO: p * -logsigmoid(x) + (1 - p) * -logsigmoid(-x), x = LOGITS [1.0, -1.5]
    expected = (0.8 * softplus(-1.0) + 0.2 * softplus(1.0) + 0.6 * softplus(1.5) + 0.4 * softplus(-1.5)) / 2
    out = loss("dpo", labels=P)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() != pytest.approx(loss("dpo").loss.item(), rel=1e-3)  # the label changes the loss
    assert out.metrics["label_mean"].item() == pytest.approx(0.7)


def test_soft_label_hinge_by_hand():
    # p relu(1 - x) + (1 - p) relu(1 + x): pair 1 0.8 * 0 + 0.2 * 2 = 0.4, pair 2 0.6 * 2.5 + 0.4 * 0 = 1.5
    assert loss("hinge", labels=P).loss.item() == pytest.approx((0.4 + 1.5) / 2, rel=1e-6)


def test_soft_label_ipo_by_hand():
    # target (2p - 1)/2 = [0.3, 0.1]: (1.0 - 0.3)^2 = 0.49, (-1.5 - 0.1)^2 = 2.56
    assert loss("ipo", labels=P).loss.item() == pytest.approx((0.49 + 2.56) / 2, rel=1e-6)
    # = the IPO loss expected over which image won, p (x - 1/2)^2 + (1 - p) (x + 1/2)^2, less p (1 - p)
    expected = sum(p * (x - 0.5) ** 2 + (1 - p) * (x + 0.5) ** 2 - p * (1 - p) for p, x in zip([0.8, 0.6], LOGITS)) / 2
    assert loss("ipo", labels=P).loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_soft_label_cpo_by_hand(lam):
    # reference-free logits [1.0, -0.5]; the winner-error term is not label-weighted. (Not P: with
    # P = [0.8, 0.6] the two pairs' changes cancel at these logits.)
    expected = (0.9 * softplus(-1.0) + 0.1 * softplus(1.0) + 0.7 * softplus(0.5) + 0.3 * softplus(-0.5)) / 2 + lam * 0.2
    out = loss("cpo", cpo_lambda=lam, labels=torch.tensor([0.9, 0.7]), ref=None)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() != pytest.approx(loss("cpo", cpo_lambda=lam, ref=None).loss.item(), rel=1e-3)


def test_soft_label_orpo_by_hand():
    r = [log_odds(1.0) - log_odds(2.0), log_odds(3.0) - log_odds(2.5)]
    odds_term = (0.8 * softplus(-r[0]) + 0.2 * softplus(r[0]) + 0.6 * softplus(-r[1]) + 0.4 * softplus(r[1])) / 2
    expected = (1.0 + 3.0) / 2 + 0.3 * odds_term
    assert loss("orpo", orpo_lambda=0.3, labels=P, ref=None).loss.item() == pytest.approx(expected, rel=1e-6)


def test_soft_label_sft_trains_the_winner_unchanged():
    assert loss("sft", labels=P, ref=None).loss.item() == pytest.approx(0.2, rel=1e-6)


def test_label_smoothing_by_hand():
    # hard labels: p = 1 - eps = 0.9
    expected = (0.9 * softplus(-1.0) + 0.1 * softplus(1.0) + 0.9 * softplus(1.5) + 0.1 * softplus(-1.5)) / 2
    assert loss("dpo", label_smoothing=0.1).loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss("dpo", label_smoothing=0.1, labels=torch.ones(2)).loss.item() == pytest.approx(expected, rel=1e-6)
    # soft labels: p (1 - eps) + (1 - p) eps = [0.74, 0.58]; IPO targets (2p - 1)/2 = [0.24, 0.08]
    expected = ((1.0 - 0.24) ** 2 + (-1.5 - 0.08) ** 2) / 2
    out = loss("ipo", label_smoothing=0.1, labels=P)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["label_mean"].item() == pytest.approx(0.66)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_hard_labels_give_the_old_loss_bit_for_bit(objective):
    ref = None if objective not in NEEDS_REFERENCE else REF
    grads = []
    for labels in (None, torch.ones(2), [1.0, 1.0]):
        pol = POL.clone().requires_grad_(True)
        out = preference_loss(pol, ref, objective=objective, beta=BETA, cpo_lambda=0.5, labels=labels)
        out.loss.backward()
        grads.append((out.loss.detach(), pol.grad))
    for loss_value, grad in grads[1:]:
        assert torch.equal(loss_value, grads[0][0]) and torch.equal(grad, grads[0][1])
    assert "label_mean" not in preference_loss(POL, ref, objective=objective, beta=BETA).metrics


@pytest.mark.parametrize("objective", ["dpo", "hinge", "ipo"])
def test_half_label_is_symmetric(objective):
    half = torch.full((2,), 0.5)
    swapped_pol, swapped_ref = torch.cat([POL[2:], POL[:2]]), torch.cat([REF[2:], REF[:2]])
    a = preference_loss(POL, REF, objective=objective, beta=BETA, labels=half).loss
    b = preference_loss(swapped_pol, swapped_ref, objective=objective, beta=BETA, labels=half).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # at logits 0 (policy = reference) no direction is preferred: the gradient is zero
    pol = REF.clone().requires_grad_(True)
    preference_loss(pol, REF, objective=objective, beta=BETA, labels=half).loss.backward()
    assert pol.grad.abs().max().item() < 1e-7, pol.grad
    # ... while a hard label pulls the winner's error down
    pol.grad = None
    preference_loss(pol, REF, objective=objective, beta=BETA).loss.backward()
    assert (pol.grad[:2] > 0).all()


@pytest.mark.parametrize("objective", ["dpo", "hinge", "ipo"])
def test_label_below_half_is_the_swapped_pair(objective):
    # p for (w, l) is 1 - p for (l, w)
    swapped_pol, swapped_ref = torch.cat([POL[2:], POL[:2]]), torch.cat([REF[2:], REF[:2]])
    a = preference_loss(POL, REF, objective=objective, beta=BETA, labels=P).loss
    b = preference_loss(swapped_pol, swapped_ref, objective=objective, beta=BETA, labels=1 - P).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        loss("dpo", labels=torch.ones(3))
    for bad in ([1.2, 1.0], [-0.1, 1.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            loss("dpo", labels=torch.tensor(bad))
    for eps in (-0.1, 0.5):
        with pytest.raises(ValueError, match="label_smoothing"):
            loss("dpo", label_smoothing=eps)
