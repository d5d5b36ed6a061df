"""The on-policy chain on every family's tiny pipeline, through the CLI: `data generate` (the model's
own samples labelled by a user's scorer) -> `train` on them -> `sample` with the trained LoRA ->
`score` -> `compare` against the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ncppo.cli import main

REWARD = f"{Path(__file__).resolve().parent / 'test_data_generate.py'}:brightness"
COMMON = ["--steps", "2", "--height", "32", "--width", "32", "--guidance", "1", "--device", "cpu"]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_generate_train_sample_compare(family, request, tmp_path, single_thread):
    model = request.getfixturevalue(f"tiny_{family}_path")
    prompts = tmp_path / "train.txt"
    prompts.write_text("a red circle on a white background\na blue square on a black background\n")
    held_out = tmp_path / "eval.txt"
    held_out.write_text("a green triangle on a gray background\n")
    pairs = tmp_path / "pairs"
    assert main(["data", "generate", "--model", str(model), "--prompts", str(prompts), "--out", str(pairs),
                 "--per-prompt", "3", "--scorer", REWARD, "--pairs", "all", "--min-margin", "0", "--soft-labels", "0.05",
                 "--batch-size", "6", *COMMON]) == 0
    made = json.loads((pairs / "manifest.json").read_text())["counts"]
    assert made["candidates"] == 6 and made["pairs"] >= 1

    run = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(pairs), "--output-dir", str(run), "--resolution", "32",
                 "--batch-size", "2", "--lora-rank", "4", "--max-steps", "2", "--learning-rate", "5e-2",
                 "--report-to", "none", "--checkpoint-every", "0", "--space", "ncp", "--beta", "1e5",
                 "--log-every", "1"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert 0.5 < metrics[0]["label_mean"] <= 1  # the generated soft labels are the loss targets
    lora = load_file(run / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)

    for name, extra in (("base", []), ("tuned", ["--lora", str(run)])):
        assert main(["sample", "--model", str(model), "--prompts", str(held_out), "--out", str(tmp_path / name),
                     "--seeds", "0,1", *COMMON, *extra]) == 0
        assert main(["score", str(tmp_path / name), "--scorer", REWARD]) == 0
    assert main(["compare", str(tmp_path / "tuned"), str(tmp_path / "base"), "--out", str(tmp_path / "cmp"),
                 "--n-resamples", "200"]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    scores = result["metrics"][REWARD]
    assert scores["n"] == 2 and scores["mean_a"] != scores["mean_b"]  # the LoRA changed the images
