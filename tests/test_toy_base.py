"""The shipped toy base: loads like SD1.5, fp32, generates, follows its prompt; the builder runs."""

import json

import numpy as np
import pytest
import torch

from ncppo.toy import world
from ncppo.toy.base import SHIPPED_BASE, BuildConfig, build_base, load_base
from ncppo.toy.judge import judge_terms


@pytest.fixture(scope="module")
def shipped():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_BASE)  # no dtype: the SD1.5 code path
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_base_is_small_and_loads_in_fp32(shipped):
    size = sum(f.stat().st_size for f in SHIPPED_BASE.rglob("*") if f.is_file())
    assert size <= 10 * 2**20
    assert shipped.unet.dtype == shipped.vae.dtype == shipped.text_encoder.dtype == torch.float32
    assert type(shipped.scheduler).__name__ == "DDIMScheduler"
    ids = shipped.tokenizer("a red circle on a white background").input_ids
    assert len(ids) == 9 and ids[0] == 0 and ids[-1] == 1  # one token per word + bos/eos
    # the scaling factor was measured on the toy latents: scaled latents of fresh renders have unit std
    from ncppo.toy.base import encode_pool, render_pool, to_unit

    pixels, _ = render_pool(64, seed=123)
    latents = encode_pool(shipped.vae, to_unit(pixels)) * shipped.vae.config.scaling_factor
    assert 0.85 < float(latents.std()) < 1.15


def test_shipped_base_generates_deterministically_and_follows_the_background(shipped):
    prompts = ["a red circle on a white background"] * 3 + ["a blue square on a black background"] * 3
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(6)]  # noqa: E731
    kw = dict(num_inference_steps=8, guidance_scale=3.0, height=32, width=32)
    a = shipped(prompts, generator=gens(), **kw).images
    b = shipped(prompts, generator=gens(), **kw).images
    assert a[0].size == (32, 32)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    # the prompt controls the picture: backgrounds are right, and swapping prompts swaps them
    assert np.mean([judge_terms(im, p)["background"] for im, p in zip(a, prompts)]) > 0.8
    swapped = prompts[3:] + prompts[:3]
    assert np.mean([judge_terms(im, p)["background"] for im, p in zip(a, swapped)]) < 0.2


def test_adapter_loads_the_base():
    from ncppo.models import load_model

    adapter = load_model(str(SHIPPED_BASE))
    assert adapter.family == "sd" and adapter.prediction_type == "epsilon"
    x0 = adapter.encode_images(torch.zeros(1, 3, 32, 32))
    assert tuple(x0.shape) == (1, 4, 8, 8)


def test_builder_writes_a_loadable_pipeline_with_manifest(tmp_path):
    cfg = BuildConfig(out=str(tmp_path / "base"), pool_size=64, vae_steps=2, vae_batch_size=8, unet_steps=2,
                      unet_batch_size=8)
    out = build_base(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["unet_steps"] == 2 and manifest["prompts"] == world.all_prompts()
    assert set(manifest["timings"]) == {"render_s", "vae_s", "unet_s", "total_s"}
    assert manifest["params"]["unet"] == sum(p.numel() for p in load_base(SHIPPED_BASE).unet.parameters())
    pipe = load_base(out)
    assert pipe.unet.dtype == torch.float32
    import safetensors.torch

    stored = safetensors.torch.load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
