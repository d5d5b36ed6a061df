"""Cost of one NCP-DPO training step against one latent-DPO step: wall time, peak memory, FLOPs.

One step = policy forward (LoRA on, autograd) + reference forward (adapters off, no grad) + errors +
DPO loss + backward; NCP adds the encoder passes (policy with autograd; reference and target in
one no-grad call), optionally with the policy's encoder pass checkpointed. Random-weight U-Nets
(nothing is downloaded): "tiny" (ncppo.tiny) and "sd15" (the public SD1.5 U-Net config, written
out below), LoRA on to_q/to_k/to_v/to_out.0, one pair. Each variant runs in its own process so
that peak memory is its own. Prints a markdown table last.

    python benchmarks/step_cost.py --device cpu --dtype fp32 --sizes tiny,sd15 --iters 2 --warmup 1
    python benchmarks/step_cost.py --device cuda --dtype bf16            # GPU: about 1-2 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = {  # name: (space, checkpoint_encoder)
    "latent": ("latent", False),
    "ncp": ("ncp", False),
    "ncp-ckpt": ("ncp", True),
}

# The U-Net config of Stable Diffusion 1.5 (unet/config.json of the public checkpoint).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SIZES = {  # name: (latent side, text tokens, LoRA rank)
    "tiny": (16, 8, 8),
    "sd15": (64, 77, 64),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_unet(size: str, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from ncppo.tiny import tiny_unet

    torch.manual_seed(0)
    with torch.device(device):
        unet = tiny_unet() if size == "tiny" else UNet2DConditionModel(**SD15_UNET)
    unet.requires_grad_(False)
    if dtype != torch.float32:
        unet.to(dtype)
    rank = SIZES[size][2]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    for p in unet.parameters():
        if p.requires_grad:  # trainable LoRA weights in fp32, as diffusers' cast_training_params does
            p.data = p.data.float()
    return unet


def make_batch(size: str, unet, device: str, dtype: torch.dtype):
    from ncppo.tiny import tiny_scheduler  # the SD1.5 DDPM scheduler config

    side, tokens, _ = SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(0)
    scheduler = tiny_scheduler()
    x0 = torch.randn(2, 4, side, side, generator=g)
    noise = torch.randn(1, 4, side, side, generator=g).repeat(2, 1, 1, 1)
    t = torch.randint(1, 1000, (1,), generator=g).repeat(2)
    x_t = scheduler.add_noise(x0, noise, t)
    cond = torch.randn(2, tokens, unet.config.cross_attention_dim, generator=g)
    to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return dict(scheduler=scheduler, x0=to(x0), noise=to(noise), timesteps=t.to(device), x_t=to(x_t),
                encoder_hidden_states=to(cond))  # fmt: skip


def train_step(unet, batch, variant: str, autocast):
    from ncppo.lora import adapters_disabled
    from ncppo.objectives import preference_loss
    from ncppo.spaces import NCPConfig, compute_errors

    space, checkpoint_encoder = VARIANTS[variant]
    b = dict(batch)
    scheduler = b.pop("scheduler")
    with autocast():
        policy = unet(b["x_t"], b["timesteps"], b["encoder_hidden_states"]).sample
        with adapters_disabled(unet), torch.no_grad():
            reference = unet(b["x_t"], b["timesteps"], b["encoder_hidden_states"]).sample
        pol_err, ref_err = compute_errors(
            space, scheduler=scheduler, encoder=unet, policy_pred=policy, reference_pred=reference,
            config=NCPConfig(checkpoint_encoder=checkpoint_encoder), generator=torch.Generator().manual_seed(1), **b,
        )  # fmt: skip
        loss = preference_loss(pol_err, ref_err, objective="dpo", beta=2500.0).loss
    loss.backward()
    unet.zero_grad(set_to_none=True)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def count_flops(step) -> int:
    from torch.utils import flop_counter

    def already_wrapped(formula):  # registry formulas take tensors already; don't let the mode wrap them again
        def count(*args, **kwargs):
            return formula(*args, **kwargs)

        count._get_raw = True
        return count

    aten = torch.ops.aten
    # torch counts SDPA only for its CUDA kernels; the CPU flash kernel takes the same shapes
    custom = {
        aten._scaled_dot_product_flash_attention_for_cpu: already_wrapped(flop_counter.sdpa_flop),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: already_wrapped(flop_counter.sdpa_backward_flop),
    }
    with flop_counter.FlopCounterMode(display=False, custom_mapping=custom) as counter:
        step()
    return counter.get_total_flops()


def worker(args) -> dict:
    """Measure one variant in this process; returns a dict (printed as JSON by main)."""
    device, dtype = args.device, DTYPES[args.dtype]
    cuda = device.startswith("cuda")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    unet = build_unet(args.size, device, dtype)
    batch = make_batch(args.size, unet, device, dtype)
    mixed = dtype != torch.float32
    autocast = (lambda: torch.autocast(device.split(":")[0], dtype=dtype)) if mixed else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        train_step(unet, batch, args.variant, autocast)
        sync()

    if cuda:
        step()  # allocator warm
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated()
        mem = dict(peak_mib=peak / 2**20, step_mib=(peak - base) / 2**20, memory="torch.cuda.max_memory_allocated")
    else:
        # peak RSS of the first step: reset the kernel's high-water mark (VmHWM), then run once
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _rss_kib("VmRSS")
        step()
        peak = _rss_kib("VmHWM")
        mem = dict(peak_mib=peak / 1024, step_mib=(peak - base) / 1024, memory="peak RSS (VmHWM)")
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    flops = count_flops(step)
    return dict(size=args.size, variant=args.variant, device=device, dtype=args.dtype,
                time_s=statistics.median(times) if cuda else min(times), times_s=times, flops=flops, threads=torch.get_num_threads(),
                maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **mem)  # fmt: skip


def run_variant(args, size: str, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--size", size, "--variant", variant,
           "--device", args.device, "--dtype", args.dtype, "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"worker {size}/{variant} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    head = ("| U-Net | variant | time/step (s) | time x | peak mem (MiB) | peak x | step mem (MiB) | step mem x "
            "| GFLOP | FLOP x | time x / FLOP x |")  # fmt: skip
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        base = next(x for x in results if x["size"] == r["size"] and x["variant"] == "latent")
        tx, fx = r["time_s"] / base["time_s"], r["flops"] / base["flops"]
        rows.append(
            f"| {r['size']} | {r['variant']} | {r['time_s']:.3f} | {tx:.2f} | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] / base['peak_mib']:.3f} | {r['step_mib']:.0f} | {r['step_mib'] / base['step_mib']:.2f} | "
            f"{r['flops'] / 1e9:.1f} | {fx:.2f} | {tx / fx:.2f} |"
        )
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="U-Net weight dtype; not fp32 = autocast (default fp32)")
    p.add_argument("--sizes", default="tiny,sd15", help="comma-separated U-Nets: tiny, sd15 (default both)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--iters", type=int, default=None, help="timed steps per variant (default: 10 on cuda, 3 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on cuda, 1 on cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.iters = args.iters if args.iters is not None else (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = []
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            r = run_variant(args, size, variant)
            print(f"{size:5s} {variant:9s} {r['time_s']:.3f} s/step (runs {[round(t, 3) for t in r['times_s']]}), "
                  f"peak {r['peak_mib']:.0f} MiB (step {r['step_mib']:.0f} MiB), {r['flops'] / 1e9:.1f} GFLOP",
                  flush=True)  # fmt: skip
            results.append(r)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {results[0]['threads']} threads"
    print(f"\nOne DPO step, 1 pair, {args.dtype}, {device}; time: {'median' if cuda else 'min'} of {args.iters}; "
          f"'x' = ratio to latent-DPO of the same U-Net; memory: {results[0]['memory']}.\n")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
