"""Speed levers that must not change a run: regional torch.compile and channels_last."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_config

from ncppo.train.loop import train
from ncppo.train.speed import compile_blocks, repeated_block_names


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["frames"].values()) if "frames" in counters else 0


def test_compile_blocks_finds_each_familys_repeated_blocks(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    expected = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    assert expected > 0 and compile_blocks(unet, backend="eager") == expected
    from ncppo.tiny import tiny_flux_transformer, tiny_sd3_transformer

    assert compile_blocks(tiny_sd3_transformer(num_layers=4), backend="eager") == 4  # JointTransformerBlock
    assert compile_blocks(tiny_flux_transformer(num_layers=2, num_single_layers=2), backend="eager") == 4
    assert repeated_block_names(torch.nn.Linear(2, 2)) == ()
    with pytest.raises(ValueError, match="no repeated blocks known for Linear"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("space", ["ncp", "latent"])
def test_compiled_run_equals_the_eager_run_bit_for_bit(tiny_sd_path, pairs_parquet, tmp_path, space):
    """aot_eager traces the blocks (policy, adapters-off reference, NCP encoder, checkpoint recomputes)
    into graphs without generating new kernels, so the run must not move by a bit. (Inductor fuses
    kernels and rounds differently: equal within float rounding, not bitwise.)"""
    torch._dynamo.reset()
    common = dict(space=space, beta=1e5 if space == "ncp" else 2500.0, learning_rate=1e-3,
                  gradient_checkpointing=space == "ncp", checkpoint_encoder=space == "ncp")
    eager = train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "eager", **common))
    before = _compiled_frames()
    fast = train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "fast", compile=True,
                             compile_backend="aot_eager", **common))
    assert _compiled_frames() > before, "--compile compiled nothing"
    assert _losses(tmp_path / "eager") == _losses(tmp_path / "fast")
    wa, wb = load_file(eager.weights_path), load_file(fast.weights_path)
    assert wa.keys() == wb.keys()  # compiled blocks keep their state-dict names
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_channels_last_gives_the_same_losses(tiny_sd_path, pairs_parquet, tmp_path):
    """Channels-last convolutions round differently (~1e-7), so weights are compared by the run's
    losses and the denoiser's output, not bitwise: Adam's first steps turn the sign of gradient
    entries that sit at rounding level into whole lr-sized updates."""
    from diffusers import UNet2DConditionModel

    from ncppo.train.speed import to_channels_last

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        plain = unet(x, torch.tensor([10, 900]), text).sample
        to_channels_last(unet)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(unet(x, torch.tensor([10, 900]), text).sample, plain, rtol=1e-5, atol=1e-6)
    common = dict(space="ncp", beta=1e5, learning_rate=1e-3)
    train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "plain", **common))
    train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "cl", channels_last=True, **common))
    assert _losses(tmp_path / "cl") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-3)


def test_compile_does_not_recompile_after_the_first_step(tiny_sd_path, pairs_parquet, tmp_path):
    """Frames compiled in a 2-step run and in a 4-step run are the same: steps 3-4 reuse them
    (the policy, the adapters-off reference/encoder and backward each compile at step 1)."""
    counts = []
    for steps in (2, 4):
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        train(make_config(tiny_sd_path, pairs_parquet, tmp_path / f"s{steps}", space="ncp", beta=1e5,
                          max_steps=steps, compile=True, compile_backend="aot_eager"))
        counts.append(_compiled_frames())
    assert counts[0] > 0 and counts[1] == counts[0]


def test_an_unknown_compile_backend_fails_before_anything_loads(tmp_path):
    from ncppo.configs import ConfigError

    with pytest.raises(ConfigError, match="--compile-backend 'inductr' is not a torch.compile backend; known: .*inductor"):
        make_config(tmp_path / "no-model", tmp_path / "no-data", tmp_path / "run", compile=True,
                    compile_backend="inductr").validate()
