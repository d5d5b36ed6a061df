"""Training from a latent cache: the VAE and text encoders are not loaded when the cache holds
text embeddings; the cache fixes the resolution (a conflicting --resolution is an error, and
validation images are drawn at the cache's resolution)."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from ncppo.cli import main
from ncppo.data.cache import cache_latents
from ncppo.errors import InputError
from ncppo.train.config import TrainConfig
from ncppo.train.loop import train

R = 16  # the cache's resolution; the tiny pipeline's default sample size is 32 px


@pytest.fixture(scope="module")
def text_cache(tiny_sd_path, pairs_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    cache_latents(pairs_parquet, str(tiny_sd_path), out, resolution=R, text_embeddings=True, progress=False)
    return out


def config(model, data, out, **extra) -> TrainConfig:
    values = dict(model=str(model), data=str(data), output_dir=str(out), batch_size=2, lora_rank=4, max_steps=2,
                  report_to="none", checkpoint_every=0, space="latent", learning_rate=1e-3)
    return TrainConfig(**{**values, **extra})


def test_cache_with_text_embeddings_never_loads_vae_or_text_encoders(tiny_sd_path, pairs_parquet, text_cache,
                                                                     tmp_path):
    """The model folder's VAE and text-encoder weight files are garbage: loading either would fail,
    so a run that ends proves neither was loaded (on any device)."""
    model = shutil.copytree(tiny_sd_path, tmp_path / "unet-only")
    for part in ("vae", "text_encoder"):
        for weights in (model / part).glob("*.safetensors"):
            weights.write_bytes(b"not a safetensors file")
    result = train(config(model, text_cache, tmp_path / "run"))
    assert result.steps == 2 and result.weights_path.is_file()
    # the same model with the images themselves needs the VAE: then the missing weights are named
    with pytest.raises(InputError, match=f"--model {model}: cannot load .*vae"):  # the VAE loads first
        train(config(model, pairs_parquet, tmp_path / "run2", resolution=32))


def test_cache_fixes_the_resolution_of_training_and_validation_images(tiny_sd_path, text_cache, tmp_path, capsys):
    train(config(tiny_sd_path, text_cache, tmp_path / "run", max_steps=1, validation_prompts=["a red circle"],
                 sample_steps=2))
    grid = sorted((tmp_path / "run" / "validation").glob("*.png"))[-1]
    assert Image.open(grid).size == (R, R)  # one prompt: the grid is one image at the cache's size

    capsys.readouterr()
    assert main(["train", "--model", str(tiny_sd_path), "--data", str(text_cache), "--output-dir",
                 str(tmp_path / "r2"), "--resolution", "32", "--report-to", "none"]) == 2
    err = capsys.readouterr().err
    assert f"ncppo train: error: --resolution 32 conflicts with the latent cache --data {text_cache}, built at {R} px" in err
