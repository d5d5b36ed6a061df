"""What on-policy rounds need from `train`: start from a LoRA (--init-lora) and a frozen LoRA
reference (--reference-lora) while the NCP encoder stays the bare base."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ncppo.errors import InputError
from ncppo.train.loop import train
from test_train import make_config


def _first_metrics(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def trained_lora(tiny_sd_path, pairs_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("round0") / "run"
    train(make_config(tiny_sd_path, pairs_parquet, out, space="latent", learning_rate=5e-2, max_steps=3))
    return out


def test_init_lora_starts_from_the_files_weights(tiny_sd_path, pairs_parquet, trained_lora, tmp_path):
    before = load_file(trained_lora / "pytorch_lora_weights.safetensors")
    # One step at a negligible learning rate: the result is the loaded LoRA (Adam moves each weight by ~lr).
    run = train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "r1", space="latent", learning_rate=1e-12,
                            max_steps=1, init_lora=str(trained_lora)))
    after = load_file(run.weights_path)
    assert after.keys() == before.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-9
    fresh = load_file(train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "fresh", space="latent",
                                        learning_rate=1e-12, max_steps=1)).weights_path)
    assert max((fresh[k] - before[k]).abs().max().item() for k in before) > 1e-3


def test_init_lora_of_another_rank_is_refused_naming_the_file(tiny_sd_path, pairs_parquet, trained_lora, tmp_path):
    with pytest.raises(InputError, match="pytorch_lora_weights|run"):
        train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "r", lora_rank=8, lora_alpha=8.0, max_steps=1,
                          init_lora=str(trained_lora)))


@pytest.mark.parametrize("space", ["latent", "ncp"])
def test_reference_lora_is_the_reference_and_the_encoder_stays_the_base(tiny_sd_path, pairs_parquet, trained_lora,
                                                                          tmp_path, space):
    beta = 2500.0 if space == "latent" else 1e5
    common = dict(space=space, beta=beta, max_steps=1, init_lora=str(trained_lora))
    previous = _first_metrics(train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "prev",
                                                reference_lora=str(trained_lora), **common)).output_dir)
    base = _first_metrics(train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "base", **common)).output_dir)
    # The policy starts as the reference LoRA: zero margin, DPO at ln 2 exactly.
    assert previous["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert previous["implicit_acc"] == 0.5
    assert previous["ref_err_w"] == pytest.approx(previous["policy_err_w"], rel=1e-6)
    # Against the bare base the same policy is off the reference.
    assert base["reward_margin"] != 0 and abs(base["loss"] - math.log(2)) > 1e-6
    # Same policy, same noise, same encoder (the base): the policy errors agree whichever the reference.
    assert previous["policy_err_w"] == pytest.approx(base["policy_err_w"], rel=1e-5)
    assert previous["policy_err_l"] == pytest.approx(base["policy_err_l"], rel=1e-5)


def test_reference_lora_never_trains(tiny_sd_path, pairs_parquet, trained_lora, tmp_path):
    from ncppo.lora import REFERENCE_ADAPTER

    out = tmp_path / "run"
    train(make_config(tiny_sd_path, pairs_parquet, out, space="latent", max_steps=2, learning_rate=5e-2,
                      reference_lora=str(trained_lora)))
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert not any(REFERENCE_ADAPTER in k for k in saved)  # the run's file holds the trained adapter only
    assert torch.isfinite(torch.stack([v.abs().max() for v in saved.values()])).all()
