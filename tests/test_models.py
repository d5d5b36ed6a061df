"""Model adapters: one interface for SD1.x/2.x and SDXL, loaded from saved folders."""

from __future__ import annotations

import pytest
import torch

from ncppo.models import detect_family, load_model


def test_family_detection_and_prediction_type(tiny_sd_path, tiny_sd_v_path, tiny_sdxl_path):
    assert detect_family(str(tiny_sd_path)) == "sd"
    assert detect_family(str(tiny_sdxl_path)) == "sdxl"
    assert load_model(str(tiny_sd_v_path)).prediction_type == "v_prediction"


def test_sd_adapter_shapes_and_deterministic_latents(tiny_sd_path):
    m = load_model(str(tiny_sd_path))
    assert not any(p.requires_grad for p in m.unet.parameters())
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    z1, z2 = m.encode_images(pixels), m.encode_images(pixels)
    assert z1.shape == (3, 4, 16, 16) and torch.equal(z1, z2)  # posterior mean: exact repeat
    expected = m.vae.encode(pixels).latent_dist.mean * m.vae.config.scaling_factor
    torch.testing.assert_close(z1, expected)
    cond = m.encode_prompts(["a red circle", "a dog"])
    assert cond.encoder_hidden_states.shape == (2, 16, 32) and cond.pooled is None
    assert m.added_cond_kwargs(cond, torch.zeros(2, 2), torch.zeros(2, 2), (32, 32)) is None


def test_sdxl_time_ids_are_per_image(tiny_sdxl_path):
    m = load_model(str(tiny_sdxl_path))
    cond = m.encode_prompts(["a red circle", "a dog"])
    assert cond.encoder_hidden_states.shape == (2, 16, 32) and cond.pooled.shape == (2, 16)
    sizes = torch.tensor([[48, 32], [32, 40]])
    crops = torch.tensor([[8, 0], [0, 4]])
    added = m.added_cond_kwargs(cond, sizes, crops, (32, 32))
    assert added["time_ids"].tolist() == [[48, 32, 8, 0, 32, 32], [32, 40, 0, 4, 32, 32]]
    out = m.unet(torch.randn(2, 4, 16, 16), torch.tensor([1, 500]), cond.encoder_hidden_states,
                 added_cond_kwargs=added).sample
    assert out.shape == (2, 4, 16, 16)


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_build_pipeline_shares_modules_and_samples(fixture, request):
    m = load_model(str(request.getfixturevalue(fixture)))
    pipe = m.build_pipeline()
    assert pipe.unet is m.unet and pipe.vae is m.vae
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)


def test_separate_vae_folder_is_used(tiny_sd_path, tmp_path):
    from ncppo.tiny import tiny_vae

    other = tiny_vae(seed=7)
    other.save_pretrained(tmp_path / "vae-fix")
    m = load_model(str(tiny_sd_path), vae=str(tmp_path / "vae-fix"))
    for a, b in zip(m.vae.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_bf16_weights(tiny_sdxl_path):
    m = load_model(str(tiny_sdxl_path), weight_dtype=torch.bfloat16)
    assert m.unet.dtype == m.vae.dtype == torch.bfloat16
    assert m.encode_images(torch.zeros(1, 3, 32, 32)).dtype == torch.float32
