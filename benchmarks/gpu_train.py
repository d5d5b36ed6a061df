"""One prepared GPU check of `ncppo train`: speed, memory, MFU, step-1 values and the precision table.

Builds an SD1.5-architecture pipeline from configs (random weights; nothing is downloaded), writes
128 Pick-a-Pic-schema JPEG pairs at 512 px and a latent cache of them, then runs `ncppo train`
(subprocesses, LoRA rank 64, 8 pairs a step, bf16) for: latent vs NCP, from images vs from the
cache, with and without checkpointing (U-Net gradient checkpointing; NCP also its encoder pass), and
NCP in fp32 (TF32 off) for the step-1 errors, and latent and NCP with `--compile --channels-last`. It prints per run s/step (median after warm-up), peak
GPU memory, MFU against the card's dense bf16 peak (FLOPs of one step counted by torch's
FlopCounterMode), the step-1 loss / implicit accuracy / reward margin (at LoRA init they must be ln 2,
0.5 and 0 exactly), then `ncppo.spaces.diagnostics.precision_table` on the same U-Net.

    python benchmarks/gpu_train.py --out /tmp/gpu-bench            # one H100/H200: about 5 minutes
    python benchmarks/gpu_train.py --small --out /tmp/gpu-small    # the same path on the CPU, ~1-2 minutes

`--small` swaps in the tiny pipeline (ncppo.tiny), 16 pairs at 32 px, 3 steps of 2 pairs, CPU bf16.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

PEAK_BF16_DENSE = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12}
RUNS = {  # name: (space, data, mixed precision, extra flags)
    "latent / cache": ("latent", "cache", "bf16", []),
    "ncp / cache": ("ncp", "cache", "bf16", []),
    "latent / cache / gc": ("latent", "cache", "bf16", ["--gradient-checkpointing"]),
    "ncp / cache / gc + enc ckpt": ("ncp", "cache", "bf16", ["--gradient-checkpointing", "--checkpoint-encoder"]),
    "latent / images": ("latent", "images", "bf16", []),
    "ncp / images": ("ncp", "images", "bf16", []),
    "ncp / cache / fp32": ("ncp", "cache", "no", []),
    # The levers of issue 9 (regional torch.compile, channels_last); inductor compiles at step 1, and
    # s/step is the median after it. Last, so the runs above are recorded even if these overrun.
    "latent / cache / compile + cl": ("latent", "cache", "bf16", ["--compile", "--channels-last"]),
    "ncp / cache / compile + cl": ("ncp", "cache", "bf16", ["--compile", "--channels-last"]),
}


def build_pipeline(folder: Path, small: bool) -> Path:
    """An SD1.5-architecture StableDiffusionPipeline with random weights (or the tiny one), saved."""
    from ncppo.tiny import save_tiny_pipeline

    if small:
        return save_tiny_pipeline(folder, "sd")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from step_cost import SD15_UNET
    from transformers import CLIPTextConfig, CLIPTextModel

    from ncppo.tiny import build_tokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512, scaling_factor=0.18215)
    tokenizer = build_tokenizer(model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tokenizer), 1000), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def write_pairs(folder: Path, pairs: int, size: int) -> Path:
    """Pick-a-Pic-schema parquet of smooth random JPEG pairs (caption, jpg_0, jpg_1, label_0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    words = "a red blue green cat dog tree house car circle square".split()

    def image():
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    rows = [dict(caption=" ".join(rng.choice(words, 4)), jpg_0=image(), jpg_1=image(), label_0=float(i % 2))
            for i in range(pairs)]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000.parquet")
    return folder


def ncppo(*args: str, env=None) -> None:
    cmd = [sys.executable, "-m", "ncppo", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")


def count_step_flops(model: Path, args, space: str, gc: bool, enc_ckpt: bool) -> float:
    """FLOPs of one training step (forwards, backward, recomputes) as `ncppo train` runs it."""
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from ncppo.lora import adapters_disabled
    from ncppo.models import load_model
    from ncppo.spaces import NCPConfig
    from ncppo.train.step import Reference, preference_step

    device = args.device
    adapter = load_model(str(model), weight_dtype=torch.bfloat16, device=device)
    unet = adapter.unet
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if gc:
        unet.enable_gradient_checkpointing()
    unet.train()
    side = args.resolution // adapter.vae_scale_factor
    b = args.batch
    batch = dict(latents=torch.randn(b, 2, 4, side, side), captions=["a red cat"] * b,
                 original_sizes=torch.full((b, 2, 2), args.resolution),
                 crops_top_left=torch.zeros(b, 2, 2, dtype=torch.long))
    with FlopCounterMode(display=False) as counter, torch.autocast(device, dtype=torch.bfloat16):
        out = preference_step(adapter, unet, Reference(unet, lambda: adapters_disabled(unet)), batch,
                              objective="dpo", space=space, beta=1.0, cpo_lambda=0.0, orpo_lambda=0.1,
                              ncp=NCPConfig(checkpoint_encoder=enc_ckpt), generator=torch.Generator(device).manual_seed(0),
                              resolution=args.resolution)
        out.loss.backward()
    del adapter, unet
    if device == "cuda":
        torch.cuda.empty_cache()
    return float(counter.get_total_flops())


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_DENSE.items() if k in name), None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work folder (pipeline, data, runs, results.json)")
    parser.add_argument("--small", action="store_true", help="tiny pipeline on the CPU (the test of this script)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 12; --small 3)")
    parser.add_argument("--runs", default="", help="comma-separated subset of the run names")
    parser.add_argument("--precision-timesteps", default="1,10,100,500,900,999",
                        help="timesteps of the precision table ('' skips it)")
    args = parser.parse_args(argv)
    small = args.small
    args.device = "cpu" if small or not torch.cuda.is_available() else "cuda"
    args.resolution, args.batch, args.rank = (32, 2, 4) if small else (512, 8, 64)
    args.steps = args.steps or (3 if small else 12)
    pairs = 16 if small else 128
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if small:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    started = time.perf_counter()

    model = out / "model"
    if not (model / "model_index.json").exists():
        build_pipeline(model, small)
    data = write_pairs(out / "pairs", pairs, 64 if small else args.resolution)
    cache = out / "cache"
    if not (cache / "cache_info.json").exists():
        ncppo("data", "cache", str(data), "--model", str(model), "--out", str(cache), "--resolution",
              str(args.resolution), "--text-embeddings", "true", "--overwrite", "true", env=env)
    print(f"setup {time.perf_counter() - started:.0f} s", flush=True)

    wanted = [r for r in args.runs.split(",") if r] or list(RUNS)
    peak = peak_flops(args.device)
    results = {}
    for name in wanted:
        space, source, precision, extra = RUNS[name]
        run_dir = out / "runs" / name.replace(" / ", "-").replace(" + ", "-").replace(" ", "")
        run_started = time.perf_counter()
        ncppo("train", "--model", str(model), "--data", str(cache if source == "cache" else data),
              "--output-dir", str(run_dir), "--space", space, "--objective", "dpo",
              "--beta", "2500" if space == "latent" else "1e6", "--resolution", str(args.resolution),
              "--batch-size", str(args.batch), "--lora-rank", str(args.rank), "--max-steps", str(args.steps),
              "--learning-rate", "1e-5", "--mixed-precision", precision, "--checkpoint-every", "0",
              "--log-every", "1", "--report-to", "none", *extra, env=env)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        timed = [m["sec_per_step"] for m in metrics[2:]] or [m["sec_per_step"] for m in metrics]
        first = metrics[0]
        flops = count_step_flops(model, args, space, "--gradient-checkpointing" in extra,
                                 "--checkpoint-encoder" in extra) if precision == "bf16" else None
        sec = statistics.median(timed)
        results[name] = dict(
            sec_per_step=sec, peak_memory_gib=(manifest.get("peak_gpu_memory_bytes") or 0) / 2**30,
            flops_per_step=flops, mfu=(flops / sec / peak) if (flops and peak) else None,
            step1_loss=first["loss"], step1_acc=first["implicit_acc"], step1_margin=first["reward_margin"],
            step1_policy_err=(first["policy_err_w"] + first["policy_err_l"]) / 2,
            wall_s=time.perf_counter() - run_started)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        write_results(out, args, results, [], started)  # a run cut short by the time limit keeps what is done

    print_table(results)
    precision_rows = run_precision_table(model, args) if args.precision_timesteps else []
    write_results(out, args, results, precision_rows, started)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; results in {out / 'results.json'}")


def write_results(out: Path, args, results: dict, precision_rows: list, started: float) -> None:
    (out / "results.json").write_text(json.dumps(dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", small=args.small, runs=results,
        precision=precision_rows, total_s=time.perf_counter() - started), indent=2))


def print_table(results: dict) -> None:
    base = {"cache": results.get("latent / cache"), "gc": results.get("latent / cache / gc"),
            "images": results.get("latent / images")}
    print("\n| run | s/step | x latent (compile: x same space) | FLOP x | peak GiB | mem x | MFU | step-1 loss | acc | margin | step-1 error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ref = base["gc"] if "gc" in name else base["images"] if "images" in name else base["cache"]
        if "compile" in name:  # the lever against the same space without it
            ref = results.get(name.split(" / ")[0] + " / cache")
        ratio = lambda key: f"{r[key] / ref[key]:.2f}" if ref and r.get(key) and ref.get(key) else "-"  # noqa: E731
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        print(f"| {name} | {r['sec_per_step']:.3f} | {ratio('sec_per_step')} | {ratio('flops_per_step')} | "
              f"{r['peak_memory_gib']:.1f} | {ratio('peak_memory_gib')} | {mfu} | {r['step1_loss']:.7f} | "
              f"{r['step1_acc']:.2f} | {r['step1_margin']:.3g} | {r['step1_policy_err']:.4g} |")


def run_precision_table(model: Path, args) -> list[dict]:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ncp_precision import variants_for

    from ncppo.spaces.diagnostics import format_table, precision_table

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    rows = precision_table(unet, scheduler, variants=variants_for(args.device, []), pairs=2 if args.small else 8,
                           latent_size=8 if args.small else 64, device=args.device, gradients=True,
                           timesteps=[int(t) for t in args.precision_timesteps.split(",")])
    print("\nNCP precision (median relative deviation from exact fp32, TF32 off; t-1 / down):\n")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
