"""Cost of one NCP-DPO training step against one latent-DPO step: wall time, peak memory, FLOPs.

One step = policy forward (LoRA on, autograd) + reference forward (adapters off, no grad) + errors +
DPO loss + backward; NCP adds the encoder passes (policy with autograd; reference and target each
one no-grad call), optionally with the policy's encoder pass checkpointed. Random-weight denoisers
(nothing is downloaded), driven through the model adapters exactly as training drives them:
U-Nets "tiny" (ncppo.tiny) and "sd15" (the public SD1.5 U-Net config, written out below), LoRA on
to_q/to_k/to_v/to_out.0; DiTs "tiny-sd3", "tiny-flux", "sd35m" (SD3.5-medium's transformer config) and "flux"
(FLUX.1-dev's), LoRA on the attention projections including the joint/context ones, NCP through
half the joint/double-stream blocks. One pair. Each variant runs in its own process so that peak
memory is its own. Prints a markdown table last.

`--dit-blocks N` keeps the first N joint/double-stream blocks of the DiTs (FLUX: and 2N single-stream
ones), the CPU's only way to run them; `--device meta` counts FLOPs of the full architectures
without running anything (no time or memory).

    python benchmarks/step_cost.py --device cpu --dtype fp32 --sizes tiny,sd15 --iters 2 --warmup 1
    python benchmarks/step_cost.py --device cuda --dtype bf16 --sizes tiny,sd15,sd35m,flux   # GPU
    python benchmarks/step_cost.py --device meta --sizes sd35m,flux                           # FLOPs only
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
# The transformer configs of stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev.
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
SIZES = {  # name: (family, latent side at 8x VAE, text tokens, LoRA rank)
    "tiny": ("sd", 16, 8, 8),
    "sd15": ("sd", 64, 77, 64),
    "tiny-sd3": ("sd3", 16, 272, 8),
    "tiny-flux": ("flux", 16, 512, 8),
    "sd35m": ("sd3", 128, 333, 32),  # 1024 px; 77 CLIP + 256 T5 tokens
    "flux": ("flux", 128, 512, 32),  # 1024 px; 512 T5 tokens
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_denoiser(size: str, device: str, dtype: torch.dtype, dit_blocks: int | None = None):
    """(a ModelAdapter around a random-weight denoiser with a fresh LoRA, its description)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from peft import LoraConfig

    from ncppo.models import FAMILIES
    from ncppo.tiny import tiny_flow_scheduler, tiny_flux_transformer, tiny_scheduler, tiny_sd3_transformer, tiny_unet

    family, _, _, rank = SIZES[size]
    config = {"sd35m": dict(SD35M_TRANSFORMER), "flux": dict(FLUX_TRANSFORMER)}.get(size)
    if config and dit_blocks:  # fewer blocks, real widths (the CPU cannot hold or run the whole DiT)
        config["num_layers"] = min(config["num_layers"], dit_blocks)
        if size == "flux":
            config["num_single_layers"] = min(config["num_single_layers"], 2 * dit_blocks)
        else:
            config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < dit_blocks)
    torch.manual_seed(0)
    with torch.device(device):
        net = {"tiny": tiny_unet, "sd15": lambda: UNet2DConditionModel(**SD15_UNET), "tiny-sd3": tiny_sd3_transformer,
               "tiny-flux": tiny_flux_transformer, "sd35m": lambda: SD3Transformer2DModel(**config), "flux": lambda: FluxTransformer2DModel(**config)}[size]()
    net.requires_grad_(False)
    if dtype != torch.float32:
        net.to(dtype)
    adapter_cls = FAMILIES[family]
    scheduler = tiny_scheduler() if family == "sd" else tiny_flow_scheduler(dynamic=family == "flux")
    adapter = adapter_cls(f"random {size}", net, None, [], [], scheduler, None)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                               target_modules=list(adapter.default_lora_targets)))  # fmt: skip
    for p in net.parameters():
        if p.requires_grad:  # trainable LoRA weights in fp32, as diffusers' cast_training_params does
            p.data = p.data.float()
    blocks = ""
    if family != "sd":
        from ncppo.spaces.dit import default_blocks, total_blocks

        blocks = f"{total_blocks(net)} blocks, NCP through {default_blocks(net)}"
    return adapter, blocks


def make_batch(size: str, adapter, device: str, dtype: torch.dtype, resolution: int | None = None):
    from ncppo.models import Conditioning

    family, side, tokens, _ = SIZES[size]
    side = resolution // 8 if resolution else side
    net = adapter.unet
    channels = net.config.in_channels if family != "flux" else net.config.in_channels // 4
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(2, channels, side, side, generator=g)
    noise = torch.randn(1, channels, side, side, generator=g).repeat(2, 1, 1, 1)
    width = net.config.cross_attention_dim if family == "sd" else net.config.joint_attention_dim
    pooled = None if family == "sd" else torch.randn(2, net.config.pooled_projection_dim, generator=g)
    cond = Conditioning(torch.randn(2, tokens, width, generator=g), pooled)
    process = adapter.noise_process()
    t = torch.randint(1, 1000, (1,), generator=g).repeat(2)
    x_t = process.add_noise(x0, noise, t)
    to = lambda x: x.to(device=device)  # noqa: E731
    inputs = adapter.denoiser_inputs(cond.to(device), None, None, (side * 8, side * 8), latents=to(x0), dtype=dtype)
    return dict(process=process, inputs=inputs, x0=to(x0), noise=to(noise), timesteps=t.to(device), x_t=to(x_t),
                dtype=dtype)  # fmt: skip


def train_step(adapter, batch, variant: str, autocast):
    from ncppo.lora import adapters_disabled
    from ncppo.objectives import preference_loss
    from ncppo.spaces import NCPConfig, compute_errors

    space, checkpoint_encoder = VARIANTS[variant]
    net, b, process = adapter.unet, batch, batch["process"]
    # the meta device has no autocast to ask "auto" about; every method runs the same passes (same FLOPs)
    config = NCPConfig(checkpoint_encoder=checkpoint_encoder, precision="native" if b["x0"].is_meta else "auto")
    x_in = b["x_t"].to(b["dtype"])
    with autocast():
        policy = adapter.predict(net, x_in, b["timesteps"], b["inputs"], process)
        with adapters_disabled(net), torch.no_grad():
            reference = adapter.predict(net, x_in, b["timesteps"], b["inputs"], process)
        perception = adapter.perception(net, b["inputs"], config, process) if space == "ncp" else None
        pol_err, ref_err = compute_errors(
            space, process=process, perception=perception, x0=b["x0"], x_t=b["x_t"], noise=b["noise"],
            timesteps=b["timesteps"], policy_pred=policy, reference_pred=reference, config=config,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        loss = preference_loss(pol_err, ref_err, objective="dpo", beta=2500.0).loss
    loss.backward()
    net.zero_grad(set_to_none=True)


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
    adapter, blocks = build_denoiser(args.size, device, dtype, args.dit_blocks)
    batch = make_batch(args.size, adapter, device, dtype, args.resolution)
    mixed = dtype != torch.float32 and device != "meta"
    autocast = (lambda: torch.autocast(device.split(":")[0], dtype=dtype)) if mixed else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        train_step(adapter, batch, args.variant, autocast)
        sync()

    if device == "meta":  # FLOPs only: shapes flow, nothing is computed
        return dict(size=args.size, variant=args.variant, device=device, dtype=args.dtype, blocks=blocks,
                    flops=count_flops(step), time_s=float("nan"), times_s=[], threads=0, peak_mib=float("nan"),
                    step_mib=float("nan"), maxrss_mib=float("nan"), memory="none (meta device)")  # fmt: skip

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
    return dict(size=args.size, variant=args.variant, device=device, dtype=args.dtype, blocks=blocks,
                time_s=statistics.median(times) if cuda else min(times), times_s=times, flops=flops, threads=torch.get_num_threads(),
                maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **mem)  # fmt: skip


def run_variant(args, size: str, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--size", size, "--variant", variant,
           "--device", args.device, "--dtype", args.dtype, "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    if args.dit_blocks:
        cmd += ["--dit-blocks", str(args.dit_blocks)]
    if args.resolution:
        cmd += ["--resolution", str(args.resolution)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"worker {size}/{variant} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    head = ("| denoiser | variant | time/step (s) | time x | peak mem (MiB) | peak x | step mem (MiB) | step mem x "
            "| GFLOP | FLOP x | time x / FLOP x |")  # fmt: skip
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        base = next(x for x in results if x["size"] == r["size"] and x["variant"] == "latent")
        tx, fx = r["time_s"] / base["time_s"], r["flops"] / base["flops"]
        rows.append(
            f"| {r['size']}{' (' + r['blocks'] + ')' if r.get('blocks') else ''} | {r['variant']} | "
            f"{r['time_s']:.3f} | {tx:.2f} | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] / base['peak_mib']:.3f} | {r['step_mib']:.0f} | {r['step_mib'] / base['step_mib']:.2f} | "
            f"{r['flops'] / 1e9:.1f} | {fx:.2f} | {tx / fx:.2f} |"
        )
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda[:i], or meta (FLOPs only) (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="U-Net weight dtype; not fp32 = autocast (default fp32)")
    p.add_argument("--sizes", default="tiny,sd15", help=f"comma-separated denoisers from {list(SIZES)} (default tiny,sd15)")
    p.add_argument("--dit-blocks", type=int, default=None,
                   help="keep only the first N joint/double-stream DiT blocks (FLUX: and 2N single-stream ones)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (latents = side / 8); default per denoiser: 128 (tiny), 512 (sd15), 1024 (DiTs)")
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
    device = torch.cuda.get_device_name() if cuda else ("meta device, FLOPs only" if args.device == "meta"
                                                        else f"CPU, {results[0]['threads']} threads")
    print(f"\nOne DPO step, 1 pair, {args.dtype}, {device}; time: {'median' if cuda else 'min'} of {args.iters}; "
          f"'x' = ratio to latent-DPO of the same U-Net; memory: {results[0]['memory']}.\n")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
