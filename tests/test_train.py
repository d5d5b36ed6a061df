"""End-to-end training on tiny real pipelines: objectives x spaces, LoRA export, resume, guards."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ncppo.configs import ConfigError
from ncppo.train.config import TrainConfig
from ncppo.train.loop import train


def make_config(model, data, out, **overrides) -> TrainConfig:
    values = dict(model=str(model), data=str(data), output_dir=str(out), resolution=32, batch_size=2,
                  lora_rank=4, max_steps=3, learning_rate=1e-3, report_to="none", checkpoint_every=0,
                  log_every=1, beta=2500.0, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


# Loop mechanics with and without a reference, in both spaces. That each objective moves the errors the
# way its loss says is tested in test_objective_direction.py.
@pytest.mark.parametrize("objective,space", [("dpo", "latent"), ("dpo", "ncp"), ("ipo", "ncp"), ("cpo", "latent"),
                                             ("sft", "ncp"), ("orpo", "latent")])
def test_the_loop_trains_with_and_without_a_reference(tiny_sd_path, pairs_parquet, tmp_path, objective, space):

    result = train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "run", objective=objective, space=space,
                               beta=2500.0 if space == "latent" else 1e5, cpo_lambda=0.5))
    assert result.steps == 3 and result.stopped_early is None
    lora = load_file(result.weights_path)
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
    # peft's "gaussian" init draws A and sets B = 0: non-zero B (diffusers: lora.up) means steps were applied.
    moved = [k for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert moved and any(lora[k].abs().max() > 0 for k in moved), "LoRA up/B weights did not move from zero"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(set(m) >= {"loss", "implicit_acc", "policy_err_w", "policy_err_l"} for m in metrics)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["objective"] == objective and manifest["steps"] == 3
    assert manifest["environment"]["packages"]["torch"]


def test_sdxl_trains_with_per_image_time_ids(tiny_sdxl_path, pairs_parquet, tmp_path):
    result = train(make_config(tiny_sdxl_path, pairs_parquet, tmp_path / "xl", space="ncp", beta=1e5))
    assert result.steps == 3
    assert load_file(result.weights_path)


def test_v_prediction_model_trains(tiny_sd_v_path, pairs_csv, tmp_path):
    result = train(make_config(tiny_sd_v_path, pairs_csv / "pairs.csv", tmp_path / "v", space="latent", max_steps=2))
    assert result.steps == 2


def test_saved_lora_loads_into_stock_pipeline_and_changes_output(tiny_sd_path, pairs_parquet, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "run", space="latent", learning_rate=5e-2))
    assert result.weights_path.name == "pytorch_lora_weights.safetensors"

    def draw(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = draw(pipe)
    pipe.load_lora_weights(str(tmp_path / "run"))
    after = draw(pipe)
    assert abs(after - before).max() > 1e-4


def test_resume_equals_uninterrupted_run(tiny_sd_path, pairs_parquet, tmp_path):
    common = dict(space="ncp", beta=1e5, max_steps=4, batch_size=1, gradient_accumulation_steps=2)
    full = load_file(train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "full", **common)).weights_path)

    # Cut after step 3, so step 3 is logged, then done again from checkpoint-2.
    cut = make_config(tiny_sd_path, pairs_parquet, tmp_path / "cut", checkpoint_every=2, report_to="tensorboard",
                      **common)
    cut.max_steps = 3
    train(cut)
    assert (tmp_path / "cut" / "checkpoint-2" / "trainer_state.json").is_file()
    cut.max_steps, cut.resume = 4, "latest"
    resumed = load_file(train(cut).weights_path)

    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)
    # The logs hold each step once, with the resumed run's values.
    metrics = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "cut" / "logs" / "ncppo"  # both runs' scalars: one TensorBoard run, two event files
    assert len(list(run_dir.glob("events.out.tfevents*"))) == 2
    scalars = EventAccumulator(str(run_dir)).Reload().Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2, 3, 4]
    assert [s.value for s in scalars] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)


def test_nonfinite_losses_skip_steps_then_stop_with_checkpoint(tiny_sd_path, pairs_parquet, tmp_path, monkeypatch):
    import ncppo.train.loop as loop

    real_step = loop.preference_step

    def poisoned(*args, **kwargs):
        out = real_step(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "preference_step", poisoned)
    result = train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "nan", max_steps=10, max_nonfinite=3))
    assert result.stopped_early and "non-finite" in result.stopped_early
    assert result.steps == 3  # three steps attempted, none applied
    manifest = json.loads((tmp_path / "nan" / "manifest.json").read_text())
    assert manifest["nonfinite_skipped"] == 3
    assert (tmp_path / "nan" / "checkpoint-3" / "trainer_state.json").is_file()
    lora = load_file(result.weights_path)
    assert all(lora[k].abs().max() == 0 for k in lora if "lora_B" in k or "lora.up" in k)  # never stepped


def test_ties_dropped_and_corrupt_row_skipped_counted_named(tiny_sd_path, pair_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r) for r in pair_rows]
    rows[1]["jpg_1"] = b"not an image at all"
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000.parquet")
    result = train(make_config(tiny_sd_path, folder, tmp_path / "run", batch_size=1, max_steps=5, space="latent"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert result.steps == 5
    assert manifest["data"]["stats"]["ties_dropped"] == 1
    assert manifest["skipped_rows"]["count"] >= 1
    assert any(entry[0] == 1 for entry in manifest["skipped_rows"]["rows"])  # names row 1


def test_full_finetune_saves_unet_folder(tiny_sd_path, pairs_parquet, tmp_path):
    from diffusers import UNet2DConditionModel

    result = train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "full", finetune="full", max_steps=2,
                               learning_rate=1e-3, space="ncp", beta=1e5))
    tuned = UNet2DConditionModel.from_pretrained(result.weights_path)
    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    diffs = [(a - b).abs().max().item() for a, b in zip(tuned.parameters(), base.parameters())]
    assert max(diffs) > 0


def test_invalid_values_fail_before_loading_naming_the_flag(tmp_path):
    from ncppo.cli import main

    with pytest.raises(ConfigError, match="--batch-size"):
        train(make_config("no/such/model", "no-data", tmp_path, batch_size=0))
    assert main(["train", "--model", "x", "--data", "y", "--output-dir", str(tmp_path), "--resolution", "30"]) == 2
    with pytest.raises(SystemExit):
        main(["train", "--model", "x", "--data", "y", "--output-dir", str(tmp_path), "--objective", "nope"])


def test_yaml_config_with_cli_override(tmp_path, monkeypatch):
    import ncppo.train.loop as loop
    from ncppo.cli import main

    from types import SimpleNamespace

    seen = {}

    def fake_train(config):  # only the resolved config matters here
        seen["config"] = config
        return SimpleNamespace(weights_path="w", steps=0, stopped_early=None)

    monkeypatch.setattr(loop, "train", fake_train)
    (tmp_path / "run.yaml").write_text("model: m\ndata: d\noutput-dir: o\nbeta: 100\nlora_rank: 8\nhflip: true\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--beta", "7"]) == 0
    config = seen["config"]
    assert (config.beta, config.lora_rank, config.hflip, config.model) == (7.0, 8, True, "m")
    (tmp_path / "bad.yaml").write_text("model: m\ndata: d\noutput_dir: o\nbeta_typo: 1\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2


def test_validation_images_and_eval_hook_logged(tiny_sd_path, pairs_parquet, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\na blue square on a black background\n")
    out = tmp_path / "run"
    result = train(make_config(tiny_sd_path, pairs_parquet, out, max_steps=2, space="latent", report_to="tensorboard",
                               validation_prompts=["a red circle", "a blue square"], validation_every=1,
                               eval_every=2, eval_prompts=str(prompts), eval_scorer="toy-judge", eval_seeds=[0, 1],
                               sample_steps=2))
    steps = [h["step"] for h in result.eval_history]
    assert steps == [0, 2]
    assert len(result.eval_history[0]["scores"]) == 4  # 2 prompts x 2 seeds
    first, last = (torch.tensor(h["scores"]) for h in result.eval_history)
    wins = ((last > first).float() + 0.5 * (last == first).float()).mean().item()  # per (prompt, seed), ties half
    assert result.eval_history[1]["win_rate_vs_step0"] == pytest.approx(wins)
    low, high = result.eval_history[1]["win_rate_ci"]
    assert low <= result.eval_history[1]["win_rate_vs_step0"] <= high
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["step-0000001.png", "step-0000002.png"]
    assert list((out / "logs").rglob("events.out.tfevents*")), "no TensorBoard event file"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [h["step"] for h in manifest["eval_history"]] == [0, 2]


def test_bf16_mixed_precision_with_gradient_checkpointing(tiny_sdxl_path, pairs_parquet, tmp_path):
    """Frozen weights in bf16 under autocast, LoRA weights trained in fp32, U-Net checkpointing on."""
    result = train(make_config(tiny_sdxl_path, pairs_parquet, tmp_path / "bf16", mixed_precision="bf16",
                               gradient_checkpointing=True, checkpoint_encoder=True, space="ncp", beta=1e5,
                               max_steps=2))
    assert result.steps == 2 and result.stopped_early is None
    lora = load_file(result.weights_path)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora.up" in k or "lora_B" in k)


@pytest.mark.parametrize("name", ["sd15-ncp-dpo.yaml", "sdxl-ncp-dpo.yaml"])
def test_shipped_recipe_configs_parse_and_validate(name):
    from pathlib import Path

    from ncppo.configs import build_config, load_yaml

    values = load_yaml(Path(__file__).parents[1] / "configs" / name)
    config = build_config(TrainConfig, {**values, "data": "d", "output_dir": "o"})
    assert (config.space, config.lora_rank, config.beta, config.lora_alpha) == ("ncp", 64, 2500.0, None)
    assert config.mixed_precision == "fp16" and config.scale_lr
    if name.startswith("sd15"):
        assert config.validation_prompts == ["a photo of a cat on a windowsill", "a lighthouse at dusk, oil painting"]


@pytest.fixture
def cpu_grad_scaler(monkeypatch):
    """What accelerate sets up for --mixed-precision fp16 on a GPU, on the CPU: its GradScaler (a CPU
    one here) in the same places, so that backward, clipping and the optimizer go through it."""
    import accelerate

    made = []
    real_init = accelerate.Accelerator.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        self.native_amp = True
        self.state._mixed_precision = "fp16"
        made.append(self.scaler)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", init)
    return made


def test_fp16_grad_scaler_survives_a_skipped_step_and_owns_overflow(tiny_sd_path, pairs_parquet, tmp_path,
                                                                    monkeypatch, cpu_grad_scaler):
    import ncppo.train.loop as loop

    real_step, calls = loop.preference_step, []

    def first_nan(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "preference_step", first_nan)
    # A NaN loss at step 1: the step is skipped and the scaler told (it used to raise "unscale_() has
    # already been called" at step 2). Then fp16 autocast overflows the gradients at the first scales
    # (2^15, 2^14, ... on this model): the scaler's own skips, which lower its scale and are not a
    # failed run, although they outnumber --max-nonfinite.
    result = train(make_config(tiny_sd_path, pairs_parquet, tmp_path / "fp16", space="latent", max_steps=6,
                               max_nonfinite=2))
    assert result.steps == 6 and result.stopped_early is None
    manifest = json.loads((tmp_path / "fp16" / "manifest.json").read_text())
    overflows = manifest["fp16_overflow_skipped"]
    assert manifest["nonfinite_skipped"] == 1 and 2 <= overflows < 5
    assert cpu_grad_scaler[-1].get_scale() == 2.0 ** (16 - 1 - overflows)  # halved at every skip
    lora = load_file(result.weights_path)
    assert any(lora[k].abs().max() > 0 for k in lora if "lora_B" in k)  # the later steps were applied


def test_metric_window_joins_the_collective_when_its_losses_were_not_finite():
    """Every process calls the reduce (one whose losses were all NaN used to return early and leave the
    others waiting); the mean is over the processes with a finite loss."""
    from types import SimpleNamespace

    from ncppo.train.loop import _MetricWindow

    def window(loss):
        w = _MetricWindow()
        w.add(SimpleNamespace(loss=torch.tensor(loss), metrics={"acc": torch.tensor(1.0)}))
        return w

    ranks = [window(0.5), window(float("nan"))]
    sent = []

    class Recording:
        num_processes = 2

        def reduce(self, tensor, reduction):
            sent.append((tensor, reduction))
            return tensor

    for w in ranks:
        w.reduce(Recording())
    assert len(sent) == 2 and {r for _, r in sent} == {"sum"}  # the NaN rank joined the collective
    total = sent[0][0] + sent[1][0]

    class Summed:  # what the collective returns on both ranks
        num_processes = 2

        def reduce(self, tensor, reduction):
            return total

    assert [w.reduce(Summed()) for w in ranks] == [{"acc": 1.0, "loss": 0.5}] * 2


def test_resume_latest_before_any_checkpoint_starts_over_without_duplicate_logs(tiny_sd_path, pairs_parquet,
                                                                                 tmp_path):
    config = make_config(tiny_sd_path, pairs_parquet, tmp_path / "run", space="latent", max_steps=2)
    train(config)  # as if killed after step 2, before a first checkpoint
    config.resume = "latest"
    train(config)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tiny_sd_path, pairs_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    config = make_config(tiny_sd_path, pairs_parquet, out, space="latent", max_steps=3, checkpoint_every=1)
    train(config)
    config.resume = str(out / "checkpoint-1")
    config.max_steps = 2
    train(config)
    assert "newer checkpoints set aside as abandoned-checkpoint-2, abandoned-checkpoint-3" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["abandoned-checkpoint-2", "abandoned-checkpoint-3",
                                                                 "checkpoint-1", "checkpoint-2"]
    config.resume, config.max_steps = "latest", 3
    train(config)
    assert "resumed from" in capsys.readouterr().out and (out / "checkpoint-3").is_dir()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
