"""SD3 and FLUX adapters on tiny real pipelines: detection, text conditioning, and the denoiser call
checked against the stock pipelines (one Euler step of StableDiffusion3Pipeline / FluxPipeline)."""

import json

import pytest
import torch

from ncppo.errors import InputError
from ncppo.models import detect_family, load_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_families_are_detected_from_model_index(tiny_sd3_path, tiny_sd3_no_t5_path, tiny_flux_path, tiny_sd_path):
    assert detect_family(str(tiny_sd3_path)) == "sd3"
    assert detect_family(str(tiny_sd3_no_t5_path)) == "sd3"
    assert detect_family(str(tiny_flux_path)) == "flux"
    assert detect_family(str(tiny_sd_path)) == "sd"
    from ncppo.configs import ConfigError

    with pytest.raises(ConfigError, match="--flow-shift applies to flow-matching models"):
        load_model(str(tiny_sd_path)).noise_process(shift=3.0)


@pytest.mark.parametrize("name", ["KandinskyV22Pipeline", "FluxFillPipeline", "StableDiffusion3ControlNetPipeline"])
def test_an_unsupported_pipeline_class_is_one_line_naming_it_and_the_supported_ones(tmp_path, name):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
    with pytest.raises(InputError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert "\n" not in message and repr(name) in message
    for supported in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert supported in message


def test_sd3_text_conditioning_with_and_without_t5(tiny_sd3_path, tiny_sd3_no_t5_path):
    with_t5, without = load_model(str(tiny_sd3_path)), load_model(str(tiny_sd3_no_t5_path))
    assert len(with_t5.text_encoders) == 3 and len(without.text_encoders) == 2
    assert type(with_t5.tokenizers[2]).__name__ == "T5Tokenizer"  # a real T5 tokenizer, built offline
    a, b = with_t5.encode_prompts(["a red cat", "a dog"]), without.encode_prompts(["a red cat", "a dog"])
    # CLIP-L + CLIP-G penultimate states (16 tokens), then 256 T5 tokens (zeros without T5), width 32
    assert a.encoder_hidden_states.shape == b.encoder_hidden_states.shape == (2, 16 + 256, 32)
    assert a.pooled.shape == b.pooled.shape == (2, 32)
    assert b.encoder_hidden_states[:, 16:].abs().max() == 0 and a.encoder_hidden_states[:, 16:].abs().max() > 0
    torch.testing.assert_close(a.encoder_hidden_states[:, :16], b.encoder_hidden_states[:, :16])  # same CLIPs
    assert with_t5.prediction_type == "flow" and with_t5.noise_process().shift == 3.0
    assert with_t5.encode_images(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 16, 16)  # 16-channel latents


def test_flux_conditioning_ids_and_guidance(tiny_flux_path):
    m = load_model(str(tiny_flux_path))
    cond = m.encode_prompts(["a red cat"])
    assert cond.encoder_hidden_states.shape == (1, 512, 32) and cond.pooled.shape == (1, 16)  # T5 states, CLIP pooled
    process = m.noise_process()
    assert process.dynamic and process.sampling.scheme == "logit_normal"
    inputs = m.denoiser_inputs(cond, None, None, (32, 32), latents=torch.zeros(1, 16, 16, 16), dtype=torch.float32)
    assert inputs["img_ids"].shape == (64, 3) and inputs["img_ids"][9].tolist() == [0.0, 1.0, 1.0]
    assert inputs["txt_ids"].shape == (512, 3) and inputs["guidance"].tolist() == [3.5]
    with pytest.raises(ValueError, match="--resolution must be a multiple of 4"):
        m.denoiser_inputs(cond, None, None, (30, 30), latents=torch.zeros(1, 16, 15, 15), dtype=torch.float32)


@pytest.mark.parametrize("fixture", ["tiny_sd3_path", "tiny_sd3_no_t5_path", "tiny_flux_path"])
def test_predict_is_the_stock_pipelines_velocity(fixture, request):
    """One Euler step of the stock pipeline from sigma 1 to 0 gives x = noise - v(noise, sigma 1); the
    adapter's prediction at the top level (sigma 1) with its own text conditioning must give the same v."""
    m = load_model(str(request.getfixturevalue(fixture)))
    pipe = m.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    packed = m.family == "flux"
    if packed:
        from ncppo.models.flux import pack, unpack

    start = pack(noise) if packed else noise
    out = pipe("a red cat", num_inference_steps=1, height=32, width=32, guidance_scale=3.5 if packed else 1.0,
               latents=start.clone(), output_type="latent").images
    stepped = unpack(out, 16, 16) if packed else out
    process = m.noise_process()
    top = torch.tensor([999])
    assert process.sigmas(top, noise).item() == 1.0
    inputs = m.denoiser_inputs(m.encode_prompts(["a red cat"]), None, None, (32, 32), latents=noise, dtype=torch.float32)
    with torch.no_grad():
        v = m.predict(m.unet, noise, top, inputs, process)
    torch.testing.assert_close(stepped, noise - v, rtol=1e-4, atol=1e-5)


def test_sd35m_recipe_config_parses_and_validates():
    from pathlib import Path

    from ncppo.configs import build_config, load_yaml
    from ncppo.train.config import TrainConfig

    values = load_yaml(Path(__file__).parents[1] / "configs" / "sd35m-ncp-dpo.yaml")
    assert values["optimizer"] == "adamw8bit"  # checked against an installed bitsandbytes; this machine has none
    config = build_config(TrainConfig, {**values, "data": "d", "output_dir": "o", "optimizer": "adamw"})
    assert (config.space, config.beta_normalize, config.beta, config.lora_rank, config.lora_alpha) == (
        "ncp", True, 0.3, 32, 64.0)
    assert config.mixed_precision == "bf16" and config.timestep_sampling == "auto" and config.lora_targets is None
