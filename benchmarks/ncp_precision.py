"""How far NCP errors (and their gradients) in bf16 / fp16 / TF32 are from exact fp32, per timestep.

For each t in {1, 10, 100, 500, 900, 999}: the rms of the t-1 input difference d, the exact fp32 mean
error, and per variant the median over samples of |e - e_exact| / e_exact (with --gradients also of
the gradient with respect to the prediction, ||g - g_exact|| / ||g_exact||). Variants: the frozen
weights in bf16 / fp16 under autocast (as `--mixed-precision` trains), or fp32 weights with TF32 on
(CUDA), each with `--ncp-precision native` (computed as it comes) and `scaled` (the default there);
"fp32 scaled" is the scaled method's own linearisation error. Then the cost of one encoder pass per
method. Random inputs with |eps_hat - eps| ~ 0.3; nothing is downloaded.

    python benchmarks/ncp_precision.py --model tiny --gradients                  # CPU, seconds
    python benchmarks/ncp_precision.py --model toy --gradients                   # the toy world's trained U-Net
    python benchmarks/ncp_precision.py --model sd15 --pairs 2 --latent-size 8    # SD1.5 architecture, CPU: minutes
    python benchmarks/ncp_precision.py --model sd15 --device cuda --pairs 8 --latent-size 64 --gradients
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def load_unet(name: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ncppo.tiny import tiny_scheduler, tiny_unet

    if name == "tiny":
        return tiny_unet(0), tiny_scheduler(), 77
    if name == "sd15":
        from step_cost import SD15_UNET

        torch.manual_seed(0)
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, clip_sample=False, prediction_type="epsilon")
        return UNet2DConditionModel(**SD15_UNET), scheduler, 77
    if name == "toy":
        from ncppo.toy.base import SHIPPED_BASE

        name = str(SHIPPED_BASE)
    unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler")
    return unet, scheduler, 16


def variants_for(device: str, names: list[str]) -> dict:
    table = {
        "bf16 native": (torch.bfloat16, "native"), "bf16 scaled": (torch.bfloat16, "scaled"),
        "fp16 native": (torch.float16, "native"), "fp16 scaled": (torch.float16, "scaled"),
        "tf32 native": (None, "native", True), "tf32 scaled": (None, "scaled", True),
        "fp32 scaled": (None, "scaled"),
    }  # fmt: skip
    if device != "cuda":  # no TF32 on the CPU
        table = {k: v for k, v in table.items() if not k.startswith("tf32")}
    return {k: v for k, v in table.items() if not names or k in names}


def time_methods(unet, scheduler, args, device) -> list[tuple[str, float, float]]:
    """(method, ms per no-grad NCP error call, ms per call with backward), low precision = bf16 weights."""
    from ncppo.spaces import NCPConfig
    from ncppo.spaces.diagnostics import _copy_in, errors_at, ncp_problem, tf32

    half = _copy_in(unet, torch.bfloat16, device)
    problem = ncp_problem(half, scheduler, pairs=args.pairs, latent_size=args.latent_size, device=device,
                          cond_len=args.cond_len)
    rows = []
    for method in ("native", "scaled", "fp32"):
        config = NCPConfig(layers=args.layers, precision=method)
        cells = []
        for with_grad in (False, True):
            def call():
                with tf32(False):
                    errors_at(half, problem, 500, config=config, autocast_dtype=torch.bfloat16, with_grad=with_grad)
            for _ in range(args.warmup):
                call()
            times = []
            for _ in range(args.iters):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                call()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            cells.append(1000 * min(times))
        rows.append((method, *cells))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | toy | sd15 (random weights) | a diffusers pipeline folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--latent-size", type=int, default=8)
    parser.add_argument("--layers", default="down", choices=["down", "mid", "multi"])
    parser.add_argument("--scale-rms", type=float, default=0.1)
    parser.add_argument("--timesteps", default="1,10,100,500,900,999")
    parser.add_argument("--variants", default="", help="comma-separated subset of the variant names")
    parser.add_argument("--gradients", action="store_true", help="also the gradients' deviation")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per method (min is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from ncppo.spaces import NCPConfig
    from ncppo.spaces.diagnostics import format_table, precision_table

    unet, scheduler, args.cond_len = load_unet(args.model)
    unet.requires_grad_(False).eval()
    device = args.device
    variants = variants_for(device, [v for v in args.variants.split(",") if v])
    started = time.perf_counter()
    rows = precision_table(unet, scheduler, variants=variants, pairs=args.pairs, latent_size=args.latent_size,
                           timesteps=[int(t) for t in args.timesteps.split(",")], device=device,
                           ncp=NCPConfig(layers=args.layers, scale_rms=args.scale_rms), gradients=args.gradients)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{args.model} U-Net, {name}, {args.pairs} pairs, {args.latent_size}x{args.latent_size} latents, "
          f"t-1 / {args.layers}, scale_rms {args.scale_rms}; median relative deviation from exact fp32 (TF32 off) "
          f"[{time.perf_counter() - started:.0f} s]\n")
    print(format_table(rows))
    print("\nencoder cost per NCP error call (bf16 weights; fp32 = the exact method), ms:\n")
    print("| method | no grad | with backward |\n|---|---|---|")
    for method, plain, grad in time_methods(unet, scheduler, args, device):
        print(f"| {method} | {plain:.1f} | {grad:.1f} |")


if __name__ == "__main__":
    main()
