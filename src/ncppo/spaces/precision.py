"""Feature distances between nearly equal inputs, correct in bf16, fp16 and TF32.

NCP compares a frozen encoder's features of x'_pred and x'_true. In "t-1" mode they differ by
d = x'_pred - x'_true of ~1e-3 rms: below half a bf16 ulp of x' (~4e-3 at |x'| ~ 1) and a few
fp16 ulps. An encoder that rounds its input and activations to bf16 then compares mostly
rounding noise (measured: 6-124x off the exact fp32 error). The methods (``--ncp-precision``):

  scaled  e = mean((f(x' + s d) - f(x'))^2) / s^2 with s = max(1, r / rms(d)) per sample
          (r = ``scale_rms``, default 0.1; s is a constant for autograd). The difference is
          magnified to rms r before the encoder sees it, so rounding is small beside it. Its
          gradient takes the encoder's Jacobian at x' (the target pass carries autograd, the
          policy pass does not): 2 J(x')^T (f(x' + s d) - f(x')) / (N s), -> 2 J^T J d / N. A first
          order approximation where s > 1; exact where rms(d) >= r (s = 1), so the "uniform" and
          "same" modes, whose d is large, are computed as they are.
  fp32    exact: the encoder passes run in float32, with float32 copies of the low-precision
          encoder weights, autocast and TF32 off. Costs ~7x a bf16 pass on a GPU plus transient
          fp32 weights.
  native  the features in whatever precision the caller runs (weights' dtype, autocast): exact
          only in full fp32 without TF32.
  auto    "native" where that is exact (float32 weights, no autocast, on the CPU or on CUDA with
          TF32 disabled), else "scaled". The default.

Equal differences must give bit-equal errors (policy == reference at LoRA init gives a DPO loss of
exactly ln 2): the target, every reference and the policy each take their own encoder call of the
same batch shape, so equal inputs run identical kernels.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterable, Sequence

import torch

METHODS = ("auto", "scaled", "fp32", "native")

Encode = Callable[[torch.Tensor, bool], list[torch.Tensor]]  # (x, with_grad) -> feature levels


def _floating(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    return [t for m in modules for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()]


def exact_is_free(modules: Iterable[torch.nn.Module], device: torch.device) -> bool:
    """True where running ``modules`` as they are is already exact float32: float32 weights, no
    autocast for ``device``, and no TF32 (the CPU has none; CUDA only with both TF32 flags off)."""
    device = torch.device(device)
    if torch.is_autocast_enabled(device.type):
        return False
    if any(t.dtype != torch.float32 for t in _floating(modules)):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
    return False


def resolve_method(method: str, modules: Iterable[torch.nn.Module], device: torch.device) -> str:
    """The method ``auto`` stands for here ("native" or "scaled"); other methods are returned as they are."""
    if method not in METHODS:
        raise ValueError(f"NCP precision must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "native" if exact_is_free(modules, device) else "scaled"


@contextmanager
def float32_weights(modules: Iterable[torch.nn.Module], device_type: str | None = None):
    """Inside, ``modules`` compute in exact float32: low-precision parameters and buffers are swapped
    for float32 copies (restored on exit; autograd keeps the copies it saved), autocast for
    ``device_type`` is off, and so is TF32 on CUDA."""
    swapped = []
    for root in modules:
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for name, value in table.items():
                    if value is not None and value.is_floating_point() and value.dtype != torch.float32:
                        swapped.append((table, name, value))
                        table[name] = value.detach().float()
    tf32 = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        with torch.autocast(device_type, enabled=False) if device_type else nullcontext():
            yield
    finally:
        for table, name, value in swapped:
            table[name] = value
        torch.backends.cudnn.allow_tf32 = tf32[0]
        torch.set_float32_matmul_precision(tf32[1])


def magnification(difference: torch.Tensor, scale_rms: float) -> torch.Tensor:
    """Per-sample s = max(1, scale_rms / rms(d)), 1 where d is 0; detached, float32, shape (N,)."""
    d = difference.detach().float()
    rms = d.pow(2).mean(dim=tuple(range(1, d.ndim))).sqrt()
    return torch.where(rms > 0, (scale_rms / rms.clamp_min(1e-30)).clamp_min(1.0), torch.ones_like(rms))


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).mean(dim=tuple(range(1, a.ndim)))


def feature_errors(
    encode: Encode,
    target: torch.Tensor,
    differences: Sequence[torch.Tensor],
    *,
    method: str,
    scale_rms: float = 0.1,
    normalize_levels: bool = False,
    exact_modules: Iterable[torch.nn.Module] = (),
) -> list[torch.Tensor]:
    """Per-sample errors (N,) float32 of each input ``target + differences[k]`` against ``target``:
    mean over non-batch dims of the squared feature difference, averaged over the feature levels.

    ``encode(x, with_grad)`` runs the frozen encoder on float32 inputs x (N, ...) and returns its
    feature levels; ``differences[0]`` is the policy's and its pass keeps autograd, the others'
    (references) do not. ``method``: "scaled", "fp32" or "native" (resolve "auto" first with
    ``resolve_method``); "fp32" upcasts ``exact_modules``. ``normalize_levels``: divide each level's
    error by the variance of its target features (a detached scalar), so levels weigh alike.
    """
    if method not in ("scaled", "fp32", "native"):
        raise ValueError(f"feature_errors wants a resolved method (scaled, fp32, native), got {method!r}")
    if not scale_rms > 0:
        raise ValueError(f"scale_rms must be > 0, got {scale_rms}")
    target = target.float()
    ones = torch.ones(target.shape[0], device=target.device)
    scales = [magnification(d, scale_rms) if method == "scaled" else ones for d in differences]
    column = (-1,) + (1,) * (target.ndim - 1)
    policy = differences[0]
    jacobian_at_target = method == "scaled" and torch.is_grad_enabled() and policy.requires_grad

    with ExitStack() as stack:
        if method == "fp32":
            stack.enter_context(float32_weights(exact_modules, target.device.type))
        # Target and references without autograd; the one pass with autograd last (its activations stay).
        features = {k: encode(target + scales[k].view(column) * differences[k].float(), False)
                    for k in range(1, len(differences))}
        if jacobian_at_target:
            # Policy pass without autograd; the gradient is the encoder's VJP at x'_true (the target pass),
            # where the exact gradient's Jacobian (taken within d of x'_true) lies, not at x'_true + s d,
            # s times farther: this halves the gradient's linearisation error at no cost.
            features[0] = encode(target + scales[0].view(column) * policy.detach().float(), False)
            probe = target + scales[0].view(column) * (policy.float() - policy.detach().float())  # == target
            target_features = encode(probe, True)
            features[0] = [f + (g - g.detach()) for f, g in zip(features[0], target_features)]
            target_features = [g.detach() for g in target_features]
        else:
            target_features = encode(target, False)
            features[0] = encode(target + scales[0].view(column) * policy.float(), True)
        level_scales = [g.float().var().clamp_min(1e-12) if normalize_levels else 1.0 for g in target_features]

    errors = []
    for k, s in enumerate(scales):
        per_level = [_per_sample_mse(f, g) / c for f, g, c in zip(features[k], target_features, level_scales)]
        errors.append(torch.stack(per_level).mean(0) / s.pow(2))
    return errors
