"""How far NCP errors in a low precision are from the exact float32 ones (the precision table).

Used by the tests (tiny U-Net, CPU), ``benchmarks/ncp_precision.py`` (SD1.5 architecture) and
``benchmarks/gpu_train.py``; works on any UNet2DConditionModel, so a user can check their own model.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch

from .latent import prediction_target
from .ncp import NCPConfig, ncp_errors

TIMESTEPS = (1, 10, 100, 500, 900, 999)


def ncp_problem(unet, scheduler, *, pairs: int, latent_size: int, cond_len: int = 77, pred_noise: float = 0.3,
                seed: int = 0, device="cpu") -> dict:
    """Random float32 inputs of ``ncp_errors`` for ``pairs`` pairs (t filled in per call): latents, shared
    noise, text states, SDXL-style added conditioning if the U-Net needs it, and a prediction
    |eps_hat - eps| ~ ``pred_noise`` of the scheduler's prediction type."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config.in_channels
    x0 = torch.randn(2 * pairs, c, latent_size, latent_size, generator=g)
    noise = torch.randn(pairs, c, latent_size, latent_size, generator=g).repeat(2, 1, 1, 1)
    cond = torch.randn(2 * pairs, cond_len, unet.config.cross_attention_dim, generator=g)
    wrong = pred_noise * torch.randn(x0.shape, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        size = float(latent_size * 8)
        added = {"text_embeds": torch.randn(2 * pairs, pooled, generator=g),
                 "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * 2 * pairs)}
    z = torch.randn(pairs, c, latent_size, latent_size, generator=g).repeat(2, 1, 1, 1)
    to = lambda x: x.to(device)  # noqa: E731
    return dict(scheduler=scheduler, x0=to(x0), noise=to(noise), cond=to(cond), wrong=to(wrong), variance_noise=to(z),
                added=None if added is None else {k: to(v) for k, v in added.items()})


def _copy_in(unet, dtype: torch.dtype, device):
    """A frozen copy of ``unet`` with its floating weights in ``dtype`` (as `from_pretrained(torch_dtype=)`)."""
    net = copy.deepcopy(unet).requires_grad_(False)
    for t in [*net.parameters(), *net.buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(device, dtype)
    return net.to(device)


def errors_at(unet, problem: dict, t: int, *, config: NCPConfig, autocast_dtype=None,
              with_grad: bool = False, loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-sample NCP errors of the problem's prediction at timestep t, their gradient with respect to the
    prediction or None), computed with ``unet`` (whose weights set the dtype) under autocast to
    ``autocast_dtype`` (None: no autocast). The gradient is taken of ``loss_scale * errors.sum()`` and
    divided by ``loss_scale`` (what a GradScaler does in fp16)."""
    p = problem
    device = p["x0"].device
    n = p["x0"].shape[0]
    timesteps = torch.full((n,), t, device=device, dtype=torch.long)
    x_t = p["scheduler"].add_noise(p["x0"], p["noise"], timesteps)
    pred = prediction_target(p["scheduler"], p["x0"], p["noise"], timesteps) + p["wrong"]
    dtype = next(unet.parameters()).dtype
    cast = lambda x: x.to(dtype)  # noqa: E731
    added = None if p["added"] is None else {k: cast(v) for k, v in p["added"].items()}
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    pred = cast(pred).float().requires_grad_(with_grad)  # the prediction as the U-Net gives it, then float32
    with torch.set_grad_enabled(with_grad), ctx:
        err, _ = ncp_errors(unet, p["scheduler"], x0=p["x0"], x_t=x_t, noise=p["noise"], timesteps=timesteps,
                            policy_pred=pred, encoder_hidden_states=cast(p["cond"]), added_cond_kwargs=added,
                            config=config, variance_noise=p["variance_noise"])
    grad = torch.autograd.grad(loss_scale * err.sum(), pred)[0].float() / loss_scale if with_grad else None
    return err.detach().float(), grad


def median_gradient_deviation(grad: torch.Tensor, exact: torch.Tensor) -> float:
    """Median over samples of ||grad - exact|| / ||exact|| (samples with a zero exact gradient left out)."""
    dims = tuple(range(1, grad.ndim))
    norm = exact.pow(2).sum(dims).sqrt()
    keep = norm > 0
    return float(((grad - exact).pow(2).sum(dims).sqrt()[keep] / norm[keep]).median())


def median_deviation(errors: torch.Tensor, exact: torch.Tensor) -> float:
    """Median over samples of |errors - exact| / exact (samples with exact == 0 are left out)."""
    keep = exact > 0
    return float(((errors[keep] - exact[keep]).abs() / exact[keep]).median())


@contextmanager
def tf32(enabled: bool):
    """TF32 for cuDNN convolutions and float32 matmuls on (as PyTorch's cuDNN default) or off, restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def precision_table(unet, scheduler, *, variants: dict[str, tuple], pairs: int = 16,
                    latent_size: int = 8, timesteps=TIMESTEPS, ncp: NCPConfig | None = None, seed: int = 0,
                    device="cpu", gradients: bool = False) -> list[dict]:
    """One row per t: rms of the input difference, the exact fp32 mean error, and per variant the median
    relative deviation from exact fp32 (TF32 off) of the errors (and with ``gradients`` of their
    gradients, as "<variant> grad"). ``variants``: name -> (low-precision dtype with autocast to it, or
    None for fp32 weights without autocast; NCP precision method[; True for TF32 on, CUDA])."""
    ncp = ncp or NCPConfig()
    exact_unet = _copy_in(unet, torch.float32, device)
    problem = ncp_problem(exact_unet, scheduler, pairs=pairs, latent_size=latent_size, seed=seed, device=device)
    low = {v[0]: _copy_in(unet, v[0], device) for v in variants.values() if v[0] is not None}
    exact_config = NCPConfig(ncp.timestep_mode, ncp.layers, precision="fp32")
    rows = []
    for t in timesteps:
        with tf32(False):
            exact, exact_grad = errors_at(exact_unet, problem, t, config=exact_config, with_grad=gradients)
        row = {"t": t, "d_rms": _difference_rms(problem, t, ncp), "exact_mean": float(exact.mean())}
        for name, (dtype, method, *tf32_on) in variants.items():
            config = NCPConfig(ncp.timestep_mode, ncp.layers, precision=method, scale_rms=ncp.scale_rms)
            net = exact_unet if dtype is None else low[dtype]
            # upstream gradient as DPO's with beta ~ 1 / error; fp16 as under a GradScaler: from 2^16 down,
            # halving while the gradient overflows
            scale = (2.0**16 if dtype == torch.float16 else 1.0) / max(row["exact_mean"], 1e-30)
            while True:
                with tf32(bool(tf32_on and tf32_on[0])):
                    err, grad = errors_at(net, problem, t, config=config, autocast_dtype=dtype,
                                          with_grad=gradients, loss_scale=scale)
                if grad is None or bool(torch.isfinite(grad).all()) or dtype != torch.float16 or scale < 1e-30:
                    break
                scale /= 2
            row[name] = median_deviation(err, exact)
            if gradients:
                row[f"{name} grad"] = median_gradient_deviation(grad, exact_grad)
        rows.append(row)
    return rows


def _difference_rms(problem: dict, t: int, ncp: NCPConfig) -> float:
    from .ncp import ncp_differences

    p = problem
    timesteps = torch.full((p["x0"].shape[0],), t, device=p["x0"].device, dtype=torch.long)
    pred = prediction_target(p["scheduler"], p["x0"], p["noise"], timesteps) + p["wrong"]
    t_prime = (timesteps - 1).clamp_min(0) if ncp.timestep_mode == "t-1" else timesteps
    (d,) = ncp_differences(p["scheduler"], ncp.timestep_mode, x0=p["x0"], noise=p["noise"], timesteps=timesteps,
                           t_prime=t_prime, predictions=[pred])
    return float(d.pow(2).mean().sqrt())


def format_table(rows: list[dict]) -> str:
    """A markdown table of ``precision_table`` rows."""
    names = [k for k in rows[0] if k not in ("t", "exact_mean", "d_rms")]
    lines = ["| t | d rms | exact error | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for r in rows:
        cells = [f"{r[n]:.3g}" for n in names]
        lines.append(f"| {r['t']} | {r['d_rms']:.2g} | {r['exact_mean']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
