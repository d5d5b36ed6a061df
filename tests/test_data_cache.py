"""`ncppo data cache`: cached latents equal on-the-fly encoding, flips match, training matches."""

from __future__ import annotations

import pytest
import torch

from ncppo.data.cache import LatentCacheDataset, cache_latents, is_latent_cache
from ncppo.data.dataset import PreferenceDataset, collate_pairs
from ncppo.data.pairs import open_pairs

R = 32


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    from ncppo.models import load_model

    return load_model(str(tiny_sd_path))


@pytest.fixture(scope="module")
def sd_cache(sd, pairs_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "sd"
    info = cache_latents(pairs_parquet, sd, out, resolution=R, hflip_latents=True, text_embeddings=True,
                         batch_size=2, shard_pairs=2, progress=False)
    return out, info


def test_cached_latents_equal_on_the_fly_encoding(sd, sd_cache, pairs_parquet):
    out, info = sd_cache
    assert is_latent_cache(out) and not is_latent_cache(pairs_parquet)
    assert info["pairs"] == 5 and info["latent_shape"] == [4, R // 2, R // 2]
    assert len(list(out.glob("shard-*.safetensors"))) == 3  # 5 pairs, 2 per shard
    images = PreferenceDataset(open_pairs(pairs_parquet), R)
    cached = LatentCacheDataset(out)
    assert len(cached) == len(images) == 5 and cached.resolution == R
    batch_img = collate_pairs([images[i] for i in range(5)])
    batch_lat = collate_pairs([cached[i] for i in range(5)])
    pix = batch_img["pixel_values"]
    expected = sd.encode_images(pix.flatten(0, 1)).unflatten(0, pix.shape[:2])
    assert batch_lat["latents"].shape == (5, 2, 4, R // 2, R // 2)
    assert torch.allclose(batch_lat["latents"], expected, atol=1e-5, rtol=0)
    for key in ("rows", "captions"):
        assert batch_lat[key] == batch_img[key]
    assert torch.equal(batch_lat["original_sizes"], batch_img["original_sizes"])
    assert torch.equal(batch_lat["crops_top_left"], batch_img["crops_top_left"])
    cond = sd.encode_prompts(batch_img["captions"])
    assert torch.allclose(batch_lat["conditioning"].encoder_hidden_states, cond.encoder_hidden_states, atol=1e-6)
    assert batch_lat["conditioning"].pooled is None


def test_flipped_latents_and_flip_draws_match_the_image_path(sd, sd_cache, pairs_parquet):
    out, _ = sd_cache
    images = PreferenceDataset(open_pairs(pairs_parquet), R, hflip=True, seed=7)
    cached = LatentCacheDataset(out, hflip=True, seed=7)
    plain = LatentCacheDataset(out)
    flips = 0
    for epoch in (0, 1):
        images.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(cached)):
            a, b = images[i], cached[i]
            assert torch.equal(a["crops_top_left"], b["crops_top_left"]), (epoch, i)
            lat = sd.encode_images(a["pixel_values"])
            assert torch.allclose(b["latents"], lat, atol=1e-5, rtol=0), (epoch, i)
            flips += int(not torch.equal(b["latents"], plain[i]["latents"]))
    assert 0 < flips < 10  # both branches were exercised
    # why the cache stores mirrored encodings: the VAE is not mirror-equivariant
    mirrored = sd.encode_images(PreferenceDataset(images.table, R)[0]["pixel_values"].flip(-1))
    assert (plain[0]["latents"].flip(-1) - mirrored).abs().max() > 1e-3


def test_hflip_needs_mirrored_latents_and_bad_rows_are_named(sd, pair_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r) for r in pair_rows]
    rows[3]["jpg_1"] = b"not an image"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    info = cache_latents(tmp_path / "bad.parquet", sd, tmp_path / "c", resolution=16, progress=False)
    assert info["pairs"] == 4 and [s["row"] for s in info["skipped"]] == [3]
    assert "image 1 cannot be decoded" in info["skipped"][0]["reason"]
    assert [LatentCacheDataset(tmp_path / "c")[i]["row"] for i in range(4)] == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="--hflip-latents"):
        LatentCacheDataset(tmp_path / "c", hflip=True)
    with pytest.raises(FileExistsError):
        cache_latents(tmp_path / "bad.parquet", sd, tmp_path / "c", resolution=16, progress=False)


def test_sdxl_cache_keeps_pooled_embeddings_and_per_image_sizes(tiny_sdxl_path, pairs_parquet, tmp_path):
    from ncppo.models import load_model

    xl = load_model(str(tiny_sdxl_path))
    cache_latents(pairs_parquet, xl, tmp_path / "xl", resolution=16, text_embeddings=True, progress=False)
    batch = collate_pairs([LatentCacheDataset(tmp_path / "xl")[i] for i in range(2)])
    cond = xl.encode_prompts(batch["captions"])
    assert torch.allclose(batch["conditioning"].pooled, cond.pooled, atol=1e-6)
    assert batch["original_sizes"].tolist() == [[[48, 32], [48, 32]], [[32, 40], [32, 40]]]


def test_three_training_steps_from_cache_equal_training_from_images(tiny_sd_path, pairs_parquet, tmp_path):
    pytest.importorskip("ncppo.train.loop")
    from safetensors.torch import load_file

    from ncppo.train.config import TrainConfig
    from ncppo.train.loop import train

    cache_latents(pairs_parquet, str(tiny_sd_path), tmp_path / "cache", resolution=16, text_embeddings=True,
                  progress=False)
    # Small lr: the inputs are bit-identical (latents, text states), but CPU kernels differ by ~1e-7
    # between the two runs, and at lr 1e-3 three Adam steps amplify that to ~5e-5 (measured); at
    # lr 1e-5 the weights move ~3e-5 and the runs differ by ~1e-7.
    common = dict(model=str(tiny_sd_path), resolution=16, batch_size=2, lora_rank=4, max_steps=3,
                  learning_rate=1e-5, report_to="none", checkpoint_every=0, log_every=1, seed=0, space="latent",
                  beta=2500.0)
    a = train(TrainConfig(data=str(pairs_parquet), output_dir=str(tmp_path / "img"), **common))
    b = train(TrainConfig(data=str(tmp_path / "cache"), output_dir=str(tmp_path / "lat"), **common))
    wa, wb = load_file(a.weights_path), load_file(b.weights_path)
    assert wa.keys() == wb.keys() and wa
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    moved = max(wa[k].abs().max().item() for k in wa if "lora_B" in k or ".lora.up." in k)
    assert moved > 2e-5  # training moved the (zero-initialised) LoRA up-weights: ~3 steps x lr
    assert diff < 1e-5 and diff < 0.01 * moved


def test_cli_cache(tiny_sd_path, pairs_parquet, tmp_path):
    import argparse

    from ncppo.data.commands import register

    parser = argparse.ArgumentParser(prog="ncppo")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "cache", str(pairs_parquet), "--model", str(tiny_sd_path), "--out",
                              str(tmp_path / "c"), "--resolution", "16", "--limit", "3", "--dtype", "float16"])
    assert args.func(args) == 0
    ds = LatentCacheDataset(tmp_path / "c")
    assert len(ds) == 3 and ds[0]["latents"].dtype == torch.float32 and ds.info["dtype"] == "float16"


@pytest.mark.slow
def test_two_processes_each_encode_a_slice_and_match_one_process(tiny_sd_path, pairs_parquet, tmp_path):
    import os
    import subprocess
    import sys

    args = ["-m", "ncppo", "data", "cache", str(pairs_parquet), "--model", str(tiny_sd_path), "--resolution", "16",
            "--shard-pairs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port)]
    proc = subprocess.run(cmd + args + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cache_latents(pairs_parquet, str(tiny_sd_path), tmp_path / "one", resolution=16, progress=False)
    one, two = LatentCacheDataset(tmp_path / "one"), LatentCacheDataset(tmp_path / "two")
    assert two.info["processes"] == 2 and len(one) == len(two) == 5
    assert {p.name[:10] for p in (tmp_path / "two").glob("shard-*")} == {"shard-p000", "shard-p001"}
    for i in range(5):
        assert one[i]["row"] == two[i]["row"]
        assert torch.allclose(one[i]["latents"], two[i]["latents"], atol=1e-6, rtol=0)


def test_out_inside_the_source_or_the_model_is_refused(tiny_sd_path, pairs_parquet, capsys):
    from test_cli_errors import fails

    before = sorted(p.name for p in tiny_sd_path.rglob("*"))
    # (no --overwrite: the old code would have failed safely on the first, and deleted nothing)
    fails(capsys, ["data", "cache", str(pairs_parquet), "--model", str(tiny_sd_path), "--out",
                   str(tiny_sd_path / "unet")], f"--out {tiny_sd_path / 'unet'} lies inside --model")
    fails(capsys, ["data", "cache", str(pairs_parquet), "--model", str(tiny_sd_path), "--out",
                   str(pairs_parquet / "c")], "lies inside the source")
    assert sorted(p.name for p in tiny_sd_path.rglob("*")) == before and pairs_parquet.exists()
