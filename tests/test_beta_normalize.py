"""--beta-normalize: the error scale is the mean reference error of the first micro-batches,
frozen after them, stored in checkpoints (exact resume) and in the manifest."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ncppo.configs import ConfigError
from ncppo.objectives import BetaScale
from ncppo.train.config import TrainConfig
from ncppo.train.loop import train


def test_beta_scale_running_mean_then_frozen():
    scale = BetaScale(batches=2)
    assert scale.observe(torch.tensor([1.0, 3.0])) == 2.0          # batch 1: mean 2
    assert scale.observe(torch.tensor([5.0, 7.0, 9.0, 11.0])) == 6.0  # (1+3+5+7+9+11) / 6
    assert scale.frozen
    assert scale.observe(torch.tensor([100.0, 100.0])) == 6.0      # frozen: later batches ignored
    restored = BetaScale(batches=5)
    restored.load_state_dict(json.loads(json.dumps(scale.state_dict())))
    assert restored.frozen and restored.value == 6.0


def test_beta_scale_skips_unusable_batches_and_sums_processes():
    scale = BetaScale(batches=2)
    assert scale.observe(torch.tensor([float("nan"), 1.0])) == 1.0  # nothing counted yet: beta untouched
    assert scale.observe(torch.zeros(4)) == 1.0                     # all errors 0 (t = 0): not counted
    assert scale.seen == 0
    assert scale.observe(torch.tensor([2.0, 4.0])) == 3.0
    # two processes: `reduce` sums (sum, count) over them, so every process gets the same scale
    two = BetaScale(batches=1, reduce=lambda t: t + torch.tensor([10.0, 2.0], dtype=t.dtype))
    assert two.observe(torch.tensor([2.0, 4.0])) == pytest.approx(16.0 / 4)


def _config(model, data, out, **overrides) -> TrainConfig:
    values = dict(model=str(model), data=str(data), output_dir=str(out), resolution=32, batch_size=2,
                  lora_rank=4, max_steps=3, learning_rate=1e-3, report_to="none", checkpoint_every=0,
                  log_every=1, seed=0, space="ncp")
    values.update(overrides)
    return TrainConfig(**values)


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_normalised_run_equals_raw_run_at_the_measured_beta(tiny_sd_path, pairs_parquet, tmp_path):
    norm = train(_config(tiny_sd_path, pairs_parquet, tmp_path / "norm", beta=0.5, beta_normalize=True,
                         beta_normalize_batches=1))
    step1 = _metrics(tmp_path / "norm")[0]
    scale = (step1["ref_err_w"] + step1["ref_err_l"]) / 2  # equal halves: the mean of batch 1's reference errors
    record = json.loads((tmp_path / "norm" / "manifest.json").read_text())["beta_normalization"]
    assert record["error_scale"] == pytest.approx(scale, rel=1e-6) and record["frozen"] and record["seen"] == 1
    assert record["effective_beta"] == pytest.approx(0.5 / scale, rel=1e-6)
    assert all(m["beta_effective"] == pytest.approx(0.5 / scale, rel=1e-6) for m in _metrics(tmp_path / "norm"))
    assert 1e3 < record["effective_beta"] < 1e9  # NCP errors are tiny: the raw beta is large

    raw = train(_config(tiny_sd_path, pairs_parquet, tmp_path / "raw", beta=0.5 / record["error_scale"]))
    a, b = load_file(norm.weights_path), load_file(raw.weights_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def test_resume_inside_the_measurement_keeps_the_scale(tiny_sd_path, pairs_parquet, tmp_path):
    common = dict(space="latent", beta=2.0, beta_normalize=True, beta_normalize_batches=3, max_steps=4, batch_size=1)
    full = load_file(train(_config(tiny_sd_path, pairs_parquet, tmp_path / "full", **common)).weights_path)
    cut = _config(tiny_sd_path, pairs_parquet, tmp_path / "cut", checkpoint_every=2, **common)
    cut.max_steps = 2
    train(cut)
    saved = json.loads((tmp_path / "cut" / "checkpoint-2" / "trainer_state.json").read_text())["beta_scale"]
    assert saved["seen"] == 2 and saved["batches"] == 3  # checkpoint taken mid-measurement
    cut.max_steps, cut.resume = 4, "latest"
    resumed = load_file(train(cut).weights_path)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)


def test_bad_batches_flag_refused():
    with pytest.raises(ConfigError, match="beta-normalize-batches"):
        _config("m", "d", "o", beta_normalize=True, beta_normalize_batches=0).validate()
