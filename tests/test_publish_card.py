"""The model card: README.md in the Hub's format, written by every training run and by
`ncppo export --card` (with the eval table of `ncppo compare` output)."""

from __future__ import annotations

import json

import numpy as np
import torch
import yaml

from ncppo.cli import main
from ncppo.publish.card import base_license, render_card
from ncppo.publish.run import TrainedRun
from ncppo.train.config import TrainConfig
from ncppo.train.loop import train


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def scored_folder(path, scores):
    path.mkdir()
    with open(path / "scores.jsonl", "w") as fh:
        for i, s in enumerate(scores):
            fh.write(json.dumps({"prompt_index": i, "seed": 0, "prompt": f"prompt {i}", "file": f"{i}.png",
                                 "toy-judge": s}) + "\n")


def test_training_run_writes_a_hub_model_card_and_export_adds_the_eval_table(tiny_sd_path, pairs_parquet, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    prompts = ["a red circle", "a blue square"]
    train(TrainConfig(model=str(tiny_sd_path), data=str(pairs_parquet), output_dir=str(out), resolution=32,
                      batch_size=2, lora_rank=4, lora_alpha=8, max_steps=2, learning_rate=1e-3, report_to="none",
                      checkpoint_every=0, space="ncp", beta=1e5, validation_prompts=prompts, sample_steps=2))
    meta, body = split_card((out / "README.md").read_text())
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "other" and "base_model" not in meta  # a local base folder: no Hub id, no card
    assert {"text-to-image", "diffusers", "lora", "diffusers-training", "stable-diffusion", "dpo", "ncppo"} <= set(meta["tags"])
    assert [w["text"] for w in meta["widget"]] == prompts
    tiles = [Image.open(out / w["output"]["url"]) for w in meta["widget"]]
    grid = Image.open(out / "validation" / "step-0000002.png")
    assert [t.size for t in tiles] == [(32, 32)] * 2 and grid.size == (64, 32)
    assert np.array_equal(np.asarray(grid.crop((32, 0, 64, 32))), np.asarray(tiles[1].convert("RGB")))
    manifest = json.loads((out / "manifest.json").read_text())
    for fact in (f"`{manifest['data']['fingerprint']}`", "Steps: 2 of 2", "beta = 100000", "beta_dpo = 200000",
                 "LoRA rank 4, alpha 8", "NCP", 'weight_name="pytorch_lora_weights.safetensors"', "## Limitations",
                 f"{manifest['data']['pairs']} preference pairs"):
        assert fact in body, fact

    # `ncppo compare` output -> the card's eval table, as compare.md shows it
    scored_folder(tmp_path / "a", [1.0, 2.0, 3.0, 4.0])
    scored_folder(tmp_path / "b", [0.5, 2.5, 2.0, 1.0])
    cmp = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(cmp), "--n-resamples", "200"]) == 0
    assert main(["export", str(out), "--card", "--eval", str(cmp)]) == 0
    card = (out / "README.md").read_text()
    rows = [line for line in (cmp / "compare.md").read_text().splitlines() if line.startswith("| toy-judge")]
    assert rows and all(row in card for row in rows) and "75.0%" in rows[0]

    # a README.md that ncppo did not write is never overwritten, and nothing is exported then
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README.md").write_text("# my notes\n")
    lora = foreign / "lora.safetensors"
    assert main(["export", str(out), "--format", "kohya", "--out", str(lora), "--card"]) == 2
    assert (foreign / "README.md").read_text() == "# my notes\n" and not lora.exists()


def test_card_of_a_hub_base_names_it_and_reports_the_effective_beta(tmp_path):
    lora = {"m.lora_A.weight": torch.zeros(4, 8), "m.lora_B.weight": torch.zeros(8, 4)}
    config = dict(model="stabilityai/stable-diffusion-xl-base-1.0", objective="dpo", space="latent", beta=2500.0,
                  beta_normalize=True, finetune="lora", lora_rank=4, lora_targets=["to_q"], max_steps=200,
                  batch_size=4, gradient_accumulation_steps=8, learning_rate=1e-8, scale_lr=True, seed=3)
    manifest = {"processes": 8, "steps": 200, "config": config,
                "beta_normalization": {"beta": 2500.0, "error_scale": 0.5, "effective_beta": 5000.0}}
    run = TrainedRun(path=tmp_path, output_dir=tmp_path / "sdxl-dpo", model=config["model"], family="sdxl", step=200,
                     config=config, manifest=manifest, lora=lora, alpha=4.0)
    meta, body = split_card(render_card(run, kind="kohya", weights_name="sdxl-dpo.safetensors", license="openrail++"))
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0" and meta["license"] == "openrail++"
    assert "stable-diffusion-xl" in meta["tags"] and "lora" in meta["tags"] and "widget" not in meta
    assert "effective beta 5000" in body and "beta_dpo = 10000" in body
    assert "256 pairs per optimizer step" in body and "= 2.56e-06" in body  # 4 x 8 x 8 processes, --scale-lr
    assert 'weight_name="sdxl-dpo.safetensors"' in body and "No evaluation is attached" in body

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [x]\n---\n# base\n")
    assert base_license(str(base)) == "creativeml-openrail-m" and base_license(str(tmp_path)) is None


def _full_run(tmp_path, model, family):
    config = {"model": model, "family": family, "finetune": "full", "objective": "dpo", "space": "ncp", "beta": 1000.0}
    sub = "unet" if family in ("sd", "sdxl") else "transformer"
    return TrainedRun(path=tmp_path, output_dir=tmp_path / "run", model=model, family=family, step=10, config=config,
                      manifest={"config": config}, full_unet=tmp_path / "run" / sub)


def test_card_of_a_full_fine_tune_names_the_saved_denoiser_and_the_family_sampling(tmp_path):
    cases = [("black-forest-labs/FLUX.1-dev", "flux", "transformer", "FluxTransformer2DModel", 28, 3.5, "bfloat16"),
             ("stabilityai/stable-diffusion-3.5-medium", "sd3", "transformer", "SD3Transformer2DModel", 28, 4.5,
              "bfloat16"),
             ("stabilityai/stable-diffusion-3-medium-diffusers", "sd3", "transformer", "SD3Transformer2DModel", 28,
              7.0, "bfloat16"),
             ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "U-Net", "UNet2DConditionModel", 50, 7.5, "float16")]
    for model, family, name, cls, steps, guidance, dtype in cases:
        text = render_card(_full_run(tmp_path, model, family), kind="full")
        sub = "unet" if name == "U-Net" else "transformer"
        assert f"# run: NCP-DPO fine-tuned {name} for {model}\n" in text
        assert f"from diffusers import DiffusionPipeline, {cls}\n" in text
        assert (f'{sub} = {cls}.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER", subfolder="{sub}", '
                f'torch_dtype=torch.{dtype})\npipe = DiffusionPipeline.from_pretrained("{model}", {sub}={sub}, ') in text
        assert f"The fine-tuned {name} ({cls}) in `{sub}/`" in text
        assert f"num_inference_steps={steps}, guidance_scale={guidance})" in text
        if family in ("flux", "sd3"):
            assert "U-Net" not in text.split("## Method")[0] + text.split("## How to use")[1].split("## Limitations")[0]
            assert "UNet2DConditionModel" not in text
    lora = render_card(_full_run(tmp_path, "black-forest-labs/FLUX.1-dev", "flux"), kind="lora")
    assert "guidance_scale=3.5" in lora and "guidance_scale=7.5" not in lora


def test_card_of_a_run_with_its_own_vae_loads_that_vae(tmp_path):
    config = {"model": "stabilityai/stable-diffusion-xl-base-1.0", "family": "sdxl", "finetune": "lora",
              "objective": "dpo", "space": "latent", "beta": 5000.0, "vae": "madebyollin/sdxl-vae-fp16-fix"}
    lora = {"m.lora_A.weight": torch.zeros(4, 8), "m.lora_B.weight": torch.zeros(8, 4)}
    run = TrainedRun(path=tmp_path, output_dir=tmp_path / "run", model=config["model"], family="sdxl", step=10,
                     config=config, manifest={"config": config}, lora=lora, alpha=4.0)
    text = render_card(run, kind="lora")
    assert "from diffusers import AutoencoderKL, DiffusionPipeline\n" in text
    assert ('vae = AutoencoderKL.from_pretrained("madebyollin/sdxl-vae-fp16-fix", torch_dtype=torch.float16)\n'
            'pipe = DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", vae=vae, ') in text
    assert "vae=vae" not in render_card(run, kind="merged")  # the merged pipeline holds the run's VAE already
