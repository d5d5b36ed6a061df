"""How far DiT NCP errors (SD3.5, FLUX) in bf16 / fp16 / TF32 are from exact fp32, per noise level.

For each level t (sigma_t on the model's own shifted schedule): the rms of the `t-1` input difference
(sigma_{t-1} - sigma_t)(v_hat - v), the exact fp32 mean error, and per variant the median over samples
of |e - e_exact| / e_exact. Variants: the frozen DiT in bf16 / fp16 under autocast (as
`--mixed-precision` trains), or fp32 with TF32 (CUDA), each with `--ncp-precision native` (as it
comes) and `scaled` (the default there); "fp32 scaled" is the scaled method's own linearisation
error. Random weights and inputs (|v_hat - v| ~ 0.3), through the adapters' perception; nothing is
downloaded. `--dit-blocks` keeps the first N joint/double-stream blocks (as benchmarks/step_cost.py).

    python benchmarks/dit_precision.py --model tiny-sd3,tiny-flux                   # CPU, a minute
    python benchmarks/dit_precision.py --model sd35m,flux --dit-blocks 2 --resolution 256 --pairs 2   # CPU
    python benchmarks/dit_precision.py --model sd35m,flux --device cuda --pairs 4 --resolution 1024
"""

from __future__ import annotations

import argparse
import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

LEVELS = (0, 10, 100, 500, 900, 999)


def variants_for(device: str) -> dict:
    table = {"bf16 native": (torch.bfloat16, "native", False), "bf16 scaled": (torch.bfloat16, "scaled", False),
             "fp16 native": (torch.float16, "native", False), "fp16 scaled": (torch.float16, "scaled", False),
             "tf32 native": (None, "native", True), "tf32 scaled": (None, "scaled", True),
             "fp32 scaled": (None, "scaled", False)}  # fmt: skip
    return {k: v for k, v in table.items() if device == "cuda" or not k.startswith("tf32")}


def errors(adapter, network, problem, level, method, dtype, tf32, device):
    from ncppo.spaces import NCPConfig, compute_errors

    p = problem
    n = p["x0"].shape[0]
    levels = torch.full((n,), level, device=device)
    process = adapter.noise_process()
    x_t = process.add_noise(p["x0"], p["noise"], levels)
    v = process.target(p["x0"], p["noise"], levels)
    wdtype = dtype or torch.float32
    pred = (v + p["wrong"]).to(wdtype).float()  # the prediction as the DiT gives it
    inputs = adapter.denoiser_inputs(p["cond"], None, None, None, latents=p["x0"], dtype=wdtype)
    config = NCPConfig(precision=method)
    perception = adapter.perception(network, inputs, config, process)
    autocast = torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        with autocast, torch.no_grad():
            err, _ = compute_errors("ncp", process=process, perception=perception, x0=p["x0"], x_t=x_t,
                                    noise=p["noise"], timesteps=levels, policy_pred=pred, config=config)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    sigma = process.sigmas(levels, p["x0"]).view(-1, 1, 1, 1)
    sigma_prime = process.sigmas(levels - 1, p["x0"]).view(-1, 1, 1, 1)
    d_rms = float(((sigma_prime - sigma) * (pred - v)).pow(2).mean().sqrt())
    return err.float(), d_rms


def problem(adapter, size, pairs, side, device, seed=0):
    from step_cost import SIZES

    from ncppo.models import Conditioning

    _, _, tokens, _ = SIZES[size]
    net = adapter.unet
    channels = net.config.in_channels if adapter.family != "flux" else net.config.in_channels // 4
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2 * pairs, channels, side, side, generator=g)
    noise = torch.randn(pairs, channels, side, side, generator=g).repeat(2, 1, 1, 1)
    wrong = 0.3 * torch.randn(x0.shape, generator=g)
    cond = Conditioning(torch.randn(pairs, tokens, net.config.joint_attention_dim, generator=g),
                        torch.randn(pairs, net.config.pooled_projection_dim, generator=g)).repeat(2)
    return {"x0": x0.to(device), "noise": noise.to(device), "wrong": wrong.to(device), "cond": cond.to(device)}


def table(size: str, args) -> str:
    from step_cost import build_denoiser

    device = args.device
    adapter, blocks = build_denoiser(size, device, torch.float32, args.dit_blocks)
    exact_net = adapter.unet.requires_grad_(False)
    side = (args.resolution or (128 if size.startswith("tiny") else 1024)) // 8
    p = problem(adapter, size, args.pairs, side, device)
    variants = variants_for(device)
    low = {dtype: copy.deepcopy(exact_net).to(dtype) for dtype, _, _ in variants.values() if dtype is not None}
    lines = [f"\n{size} ({blocks}), {side * 8} px, {2 * args.pairs} samples, {device}",
             "| t | sigma | d rms | exact error | " + " | ".join(variants) + " |", "|---" * (4 + len(variants)) + "|"]
    process = adapter.noise_process()
    for level in LEVELS:
        exact, d_rms = errors(adapter, exact_net, p, level, "fp32", None, False, device)
        cells = []
        for dtype, method, tf32 in variants.values():
            err, _ = errors(adapter, low.get(dtype, exact_net), p, level, method, dtype, tf32, device)
            keep = exact > 0
            cells.append(f"{float(((err[keep] - exact[keep]).abs() / exact[keep]).median()):.3g}")
        sigma = process.sigmas(torch.tensor([level]), p["x0"]).item()
        lines.append(f"| {level} | {sigma:.3f} | {d_rms:.2g} | {exact.mean():.3g} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd3", help="comma-separated: tiny-sd3, tiny-flux, sd35m, flux")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (latents = side / 8)")
    parser.add_argument("--dit-blocks", type=int, default=None, help="keep the first N joint/double-stream blocks")
    args = parser.parse_args(argv)
    out = [table(size, args) for size in args.model.split(",")]
    print("\nmedian |e - e_exact| / e_exact over samples, t-1 mode, random weights and inputs")
    print("\n".join(out))


if __name__ == "__main__":
    main()
