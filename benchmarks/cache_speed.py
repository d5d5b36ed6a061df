"""Data + VAE-encode cost of one training pair: from images vs from a latent cache.

An SD1.5-architecture VAE (the public SD1.5 VAE config, random weights: nothing is downloaded)
encodes both images of a pair, as `ncppo train` does on every step without a cache; with a cache
the step only reads two latents. Prints a table; the U-Net part of a step is the same either way
and is left out.

    .venv/bin/python benchmarks/cache_speed.py [--resolutions 256 512] [--pairs 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)


def sd15_vae_adapter():
    """A ModelAdapter holding only a randomly initialised SD1.5 VAE (all the cache needs)."""
    from diffusers import AutoencoderKL

    from ncppo.models import SDAdapter

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE_CONFIG).eval().requires_grad_(False)
    return SDAdapter("random-sd15-vae", None, vae, [], [], None, None)


def write_pairs(path: Path, n: int, size=(640, 512)) -> None:
    """n Pick-a-Pic-schema rows of noisy JPEGs (realistic decode cost, unlike flat colours)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        imgs = []
        for _ in range(2):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            imgs.append(buf.getvalue())
        rows.append(dict(caption=f"prompt {i}", jpg_0=imgs[0], jpg_1=imgs[1], label_0=1.0, label_1=0.0))
    pq.write_table(pa.Table.from_pylist(rows), path)


def measure(resolution: int, pairs: int, workdir: Path, adapter) -> dict:
    from ncppo.data.cache import LatentCacheDataset, cache_latents
    from ncppo.data.dataset import PreferenceDataset
    from ncppo.data.pairs import open_pairs

    data = workdir / f"pairs-{resolution}.parquet"
    write_pairs(data, pairs)
    dataset = PreferenceDataset(open_pairs(data), resolution)
    dataset[0]  # warm-up: file handles, allocator
    t0 = time.perf_counter()
    for i in range(pairs):
        dataset[i]
    load = (time.perf_counter() - t0) / pairs
    adapter.encode_images(dataset[0]["pixel_values"][:1])  # warm-up
    # building the cache does exactly the per-step work of the image path: read, crop, encode 2 images
    t0 = time.perf_counter()
    cache_latents(data, adapter, workdir / f"cache-{resolution}", resolution=resolution, batch_size=1,
                  progress=False)
    build = (time.perf_counter() - t0) / pairs
    cached = LatentCacheDataset(workdir / f"cache-{resolution}")
    cached[0]
    reps = 200
    t0 = time.perf_counter()
    for r in range(reps):
        cached[r % pairs]
    read = (time.perf_counter() - t0) / reps
    return dict(resolution=resolution, load=load, encode=max(build - load, 0.0), images=build, cache=read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="(default: 256 512)")
    parser.add_argument("--pairs", type=int, default=2, help="pairs timed per resolution (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = sd15_vae_adapter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(r, args.pairs, Path(tmp), adapter) for r in args.resolutions]
    device = f"CPU, {args.threads} torch threads" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"SD1.5-architecture VAE (random weights), one pair (2 images) per step, fp32, {device}")
    print(f"{'px':>5} | {'decode+crop ms':>14} | {'VAE encode ms':>13} | {'images pairs/s':>14} | "
          f"{'cache read ms':>13} | {'cache pairs/s':>13} | {'speed-up':>8}")
    for r in rows:
        print(f"{r['resolution']:>5} | {1e3 * r['load']:>14.1f} | {1e3 * r['encode']:>13.1f} | "
              f"{1 / r['images']:>14.2f} | {1e3 * r['cache']:>13.2f} | {1 / r['cache']:>13.1f} | "
              f"{r['images'] / r['cache']:>7.0f}x")


if __name__ == "__main__":
    main()
