"""Preference objectives on per-sample errors (pure torch; no diffusers).

Inputs are per-sample errors ordered **winners first, then losers**: ``errors[:B]`` are the
winners, ``errors[B:]`` their losers. An error is a latent MSE (Diffusion-DPO) or an NCP
perceptual error; lower error = higher likelihood of the image under the model.

The one beta convention of this project
---------------------------------------
    h      = (ref_w - ref_l) - (pol_w - pol_l)        # how much more the policy prefers the winner
    logits = beta * h
    dpo    = -logsigmoid(logits)

This equals the diffusers SD1.5 DPO example and the NCP research code (both default beta 2500).
The official Diffusion-DPO code writes ``-0.5 * beta_dpo * (model_diff - ref_diff)``, so its
``beta_dpo = 5000`` is ``beta = 2500`` here; diffusers' SDXL example uses the same 0.5 factor.
``convert_beta`` and ``BETA_CONVENTIONS`` do the conversion.

Objectives (mean over the B pairs; pol_*/ref_* are policy/reference errors)
-----------------------------------------------------------------------------
    dpo    -logsigmoid(logits)                                          needs a reference
    hinge  relu(1 - logits)                                             needs a reference
    ipo    (logits - 1/2)^2                                             needs a reference
    cpo    -logsigmoid(-beta (pol_w - pol_l)) + cpo_lambda * pol_w      (paper eq. 19)
    sft    pol_w
    orpo   beta * pol_w + orpo_lambda * -logsigmoid(log_odds_w - log_odds_l)

Labels (soft preferences)
-------------------------
``labels`` (B,) is the probability p that the first image of each pair (the winner after the data
path's orientation, so p in (0.5, 1]) is preferred; None means p = 1 (hard labels). Each pairwise
term becomes its expectation over which image won: image 0 with probability p, image 1 (the same
pair swapped: logits -> -logits, odds ratio -> -odds ratio) with probability 1 - p:

    dpo    p * -logsigmoid(logits) + (1 - p) * -logsigmoid(-logits)    (conservative DPO, Mitchell 2023)
    hinge  p * relu(1 - logits) + (1 - p) * relu(1 + logits)
    ipo    (logits - (2p - 1)/2)^2        (the expected IPO loss less its constant variance p (1 - p):
                                           target 1/2 at p = 1, 0 at p = 1/2, i.e. no preference)
    cpo    the -logsigmoid term as dpo's, on -beta (pol_w - pol_l); cpo_lambda * pol_w unchanged
    orpo   the odds-ratio term as dpo's, on log_odds_w - log_odds_l; beta * pol_w unchanged
    sft    pol_w, unchanged: the likelihood terms (sft, CPO's lambda term, ORPO's NLL term) fit the
           oriented winner whatever its label; the label only enters the pairwise terms

``label_smoothing`` eps in [0, 0.5) replaces every p by p (1 - eps) + (1 - p) eps (hard labels:
1 - eps), the usual definition. At p = 1 (labels None or all ones) and eps = 0 every loss is
bit-identical to the hard-label formulas above; at p = 1/2 dpo, hinge and ipo are symmetric in the
logits (their gradient is zero at logits 0). Metric ``label_mean`` (mean p after smoothing) is
added whenever labels or smoothing are given.

IPO scale. Azar et al. write (h_LL - 1/(2 tau))^2 on the log-likelihood-ratio difference h_LL,
with tau playing DPO's beta. Here beta * h plays beta_DPO * h_LL, so their loss is
(logits - 1/2)^2 / tau^2; we drop the constant 1/tau^2. The research code's
``(h - 1/(2 beta))^2`` on the *unscaled* h has the same minimiser (h = 1/(2 beta)) but a gradient
~beta^2 (~6e6 at beta 2500) times smaller than DPO's, so no DPO learning rate would move it;
ours has DPO's gradient scale (-beta at h = 0, DPO's is -beta/2).

ORPO for diffusion. The log-likelihood proxy of a sample is ``ll = -beta * error`` (<= 0, so
p = exp(ll) is a probability), its log odds ``ll - log(1 - exp(ll))``; ORPO (Hong et al. 2024)
adds the odds-ratio term to the winner's negative log-likelihood ``beta * pol_w``. Lowering the
winner's error lowers both terms (the research code had the odds term's sign inverted).

Normalised temperature (``--beta-normalize``)
---------------------------------------------
Errors differ by orders of magnitude between spaces (toy world, mean reference error: latent
3e-2, NCP ``t-1``/down 3e-6, NCP ``uniform`` 9e-2), so a raw beta tuned in one space means
nothing in another. ``BetaScale`` measures the mean reference error (the policy's own, detached,
for reference-free objectives) over the first micro-batches of a run and then freezes it; the
objective then uses ``beta / scale``, i.e. ``logits = beta * h / scale`` with ``h`` in units of
the typical error. The scale is part of the trainer state, so a resumed run uses the same one.

Metrics (detached scalars): ``implicit_acc`` (fraction of pairs with logits > 0, ties count
half), ``reward_margin`` (mean h = mean logits / beta, in error units, so it is comparable across
betas), ``policy_err_w``/``policy_err_l`` and, with a reference, ``ref_err_w``/``ref_err_l``.
The logits behind the metrics use the reference whenever one is given; without one they are the
reference-free ``-beta * (pol_w - pol_l)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("dpo", "hinge", "ipo", "cpo", "sft", "orpo")
NEEDS_REFERENCE = frozenset({"dpo", "hinge", "ipo"})

# value in that convention * factor = beta here
BETA_CONVENTIONS = {
    "ncppo": 1.0,  # this project: logits = beta * ((ref_w - ref_l) - (pol_w - pol_l))
    "diffusers-sd": 1.0,  # diffusers examples/research_projects/diffusion_dpo SD1.5 script
    "ncp-code": 1.0,  # the NCP research code (--beta_dpo)
    "diffusion-dpo": 0.5,  # official Diffusion-DPO: -0.5 * beta_dpo * (model_diff - ref_diff)
    "diffusers-sdxl": 0.5,  # diffusers SDXL DPO script: same 0.5 factor
    # flow matching (SD3.5/FLUX, velocity errors): -log sigmoid(-0.5 * beta * ((err_w - ref_w) - (err_l - ref_l)))
    "flow-grpo": 0.5,  # flow_grpo's SD3.5 DPO script (and verl-omni): beta 100 -> 50 here
    "flow-factory": 0.5,  # Flow-Factory DPOTrainer, -beta/2: default 2000 -> 1000 here
}


class BetaScale:
    """The frozen error scale of a normalised beta: the running mean of the errors of the first
    `batches` micro-batches (all processes together when `reduce` sums a tensor across them),
    then fixed. `observe(errors)` returns the scale to divide beta by for the current batch
    (the running mean so far, this batch included)."""

    def __init__(self, batches: int = 8, reduce=None):
        if batches < 1:
            raise ValueError(f"batches must be >= 1, got {batches}")
        self.batches, self.reduce = batches, reduce
        self.total, self.count, self.seen = 0.0, 0, 0

    @property
    def frozen(self) -> bool:
        return self.seen >= self.batches

    @property
    def value(self) -> float | None:
        """The current scale (None before any finite batch was seen)."""
        return self.total / self.count if self.count and self.total > 0 else None

    def observe(self, errors: torch.Tensor) -> float:
        if not self.frozen:
            errors = errors.detach().double().reshape(-1)
            stats = torch.stack([errors.sum(), errors.new_tensor(errors.numel())])
            if self.reduce is not None:
                stats = self.reduce(stats)
            # a batch with no finite positive error (non-finite, or all at t = 0) does not count
            if bool(torch.isfinite(stats).all()) and stats[0] > 0:
                self.total += float(stats[0])
                self.count += int(stats[1])
                self.seen += 1
        # before any counted batch the errors are all zero, so beta does not matter yet
        return self.value if self.value is not None else 1.0

    def state_dict(self) -> dict:
        return {"batches": self.batches, "total": self.total, "count": self.count, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.batches, self.total = int(state["batches"]), float(state["total"])
        self.count, self.seen = int(state["count"]), int(state["seen"])


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # detached scalars


def method_name(space: str, objective: str) -> str:
    """`NCP-DPO`, `latent-IPO`, ...: how a run's space and objective are named in cards and progress bars."""
    return f"{'NCP' if space == 'ncp' else 'latent'}-{objective.upper()}"


def convert_beta(value: float, convention: str) -> float:
    """Beta in this project's convention for a ``value`` given in ``convention``.

    >>> convert_beta(5000, "diffusion-dpo")
    2500.0
    """
    if convention not in BETA_CONVENTIONS:
        raise ValueError(f"unknown beta convention {convention!r}; known: {sorted(BETA_CONVENTIONS)}")
    return float(value) * BETA_CONVENTIONS[convention]


def _split(errors: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if errors.ndim != 1 or errors.shape[0] == 0 or errors.shape[0] % 2:
        raise ValueError(
            f"{name} must be a 1-D tensor of 2B per-sample errors (winners then losers), got shape {tuple(errors.shape)}"
        )
    return errors.float().chunk(2)


def _log_odds(nll: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(-nll); nll is clamped away from 0 where the odds are infinite."""
    nll = nll.clamp_min(1e-6)
    return -nll - torch.log(-torch.expm1(-nll))


def _targets(labels, n: int, label_smoothing: float, like: torch.Tensor) -> torch.Tensor | None:
    """The target probabilities p (n,) on `like`'s device, smoothed; None for hard labels, no smoothing."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if labels is None:
        if label_smoothing == 0:
            return None
        labels = torch.ones(n)
    p = torch.as_tensor(labels).detach()
    if p.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), one per pair, got {tuple(p.shape)}")
    p = p.to(torch.float64 if p.device.type == "cpu" else torch.float32)
    if p.device.type == "cpu" and not bool(((p >= 0) & (p <= 1)).all()):  # (on an accelerator: no sync to check)
        raise ValueError(f"labels must be probabilities in [0, 1], got {p.tolist()}")
    if label_smoothing:
        p = p * (1 - label_smoothing) + (1 - p) * label_smoothing
    return p.to(like.device, torch.float32)


def _expected(term, x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """Mean of term(x) (hard labels), or of p term(x) + (1 - p) term(-x): the pair swapped with prob. 1 - p."""
    if p is None:
        return term(x).mean()
    return (p * term(x) + (1 - p) * term(-x)).mean()


def preference_loss(
    policy_errors: torch.Tensor,
    reference_errors: torch.Tensor | None = None,
    *,
    objective: str = "dpo",
    beta: float = 2500.0,
    cpo_lambda: float = 0.0,
    orpo_lambda: float = 0.1,
    labels: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Loss and metrics of ``objective`` on per-sample errors (2B,), winners then losers.

    ``labels`` (B,): the probability that each pair's first image (the winner) is preferred, in
    [0, 1] (None: 1); ``label_smoothing`` eps moves it to p (1 - eps) + (1 - p) eps. See the module
    docstring for the formulas and the beta convention.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if objective in NEEDS_REFERENCE and reference_errors is None:
        raise ValueError(
            f"objective {objective!r} compares the policy with a reference model and needs reference_errors; "
            f"the reference-free objectives are {sorted(set(OBJECTIVES) - NEEDS_REFERENCE)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if cpo_lambda < 0 or orpo_lambda < 0:
        raise ValueError(f"cpo_lambda and orpo_lambda must be >= 0, got {cpo_lambda}, {orpo_lambda}")

    pol_w, pol_l = _split(policy_errors, "policy_errors")
    if reference_errors is not None:
        if reference_errors.shape != policy_errors.shape:
            raise ValueError(
                f"reference_errors shape {tuple(reference_errors.shape)} != policy_errors shape {tuple(policy_errors.shape)}"
            )
        ref_w, ref_l = _split(reference_errors, "reference_errors")
        logits = beta * ((ref_w - ref_l) - (pol_w - pol_l))
    else:
        logits = -beta * (pol_w - pol_l)

    p = _targets(labels, pol_w.shape[0], label_smoothing, logits)

    def nll(x):
        return -F.logsigmoid(x)

    if objective == "dpo":
        loss = _expected(nll, logits, p)
    elif objective == "hinge":
        loss = _expected(lambda x: torch.relu(1 - x), logits, p)
    elif objective == "ipo":
        loss = ((logits - (0.5 if p is None else (2 * p - 1) / 2)) ** 2).mean()
    elif objective == "cpo":
        loss = _expected(nll, -beta * (pol_w - pol_l), p) + cpo_lambda * pol_w.mean()
    elif objective == "sft":
        loss = pol_w.mean()
    else:  # orpo
        odds_ratio = _log_odds(beta * pol_w) - _log_odds(beta * pol_l)
        loss = (beta * pol_w).mean() + orpo_lambda * _expected(nll, odds_ratio, p)

    with torch.no_grad():
        metrics = {
            "implicit_acc": (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean(),
            "reward_margin": logits.mean() / beta,
            "policy_err_w": pol_w.mean(),
            "policy_err_l": pol_l.mean(),
        }
        if reference_errors is not None:
            metrics["ref_err_w"] = ref_w.mean()
            metrics["ref_err_l"] = ref_l.mean()
        if p is not None:
            metrics["label_mean"] = p.mean()
    return LossOutput(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})
