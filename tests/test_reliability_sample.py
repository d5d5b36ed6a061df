"""`ncppo sample` after a crash: the settings manifest is written before the first image, a rerun
with other settings (or another LoRA, by content) is refused, the same settings finish the job,
and a truncated last line of index.jsonl is tolerated."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ncppo.evaluate.sample as sample_mod
from ncppo.cli import main
from ncppo.evaluate.sample import MANIFEST_FILE, SampleConfig, lora_sha256, read_index, run_sample

PROMPTS = ["a red circle", "a blue square", "a green tree"]


@pytest.fixture(scope="module")
def lora_file(tiny_sd_path, tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    return folder / "pytorch_lora_weights.safetensors"


def argv(model, prompts, out, lora, *extra):
    return ["sample", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--lora", str(lora),
            "--seeds", "0", "--steps", "2", "--height", "32", "--width", "32", "--batch-size", "1", *extra]


def test_crash_then_rerun_refuses_other_settings_and_finishes_alike(tiny_sd_path, lora_file, tmp_path, monkeypatch,
                                                                     capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "samples"
    real = sample_mod.sample_images
    calls = []

    def crash_after_first_batch(*args, **kwargs):
        if calls:
            raise RuntimeError("simulated crash")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_mod, "sample_images", crash_after_first_batch)
    config = SampleConfig(model=str(tiny_sd_path), prompts=str(prompts), out=str(out), lora=str(lora_file),
                          seeds=[0], steps=2, height=32, width=32, batch_size=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sample(config)
    monkeypatch.setattr(sample_mod, "sample_images", real)

    manifest = json.loads((out / MANIFEST_FILE).read_text())  # written before the first image
    assert manifest["status"] == "running"
    assert manifest["settings"]["lora_sha256"] == lora_sha256(str(lora_file))
    assert len(manifest["prompt_hashes"]) == 3
    assert [p.name for p in (out / "images").iterdir()] == ["00000_0.png"]
    assert not (out / "index.jsonl").exists()

    # other settings: refused in one line, nothing added
    capsys.readouterr()
    assert main(argv(tiny_sd_path, prompts, out, lora_file, "--guidance", "3")) == 2
    assert "guidance: 7.5 there, 3.0 now" in capsys.readouterr().err
    # the same LoRA under another path is the same LoRA: the run continues where it stopped
    moved = shutil.copy(lora_file, tmp_path / "moved.safetensors")
    assert main(argv(tiny_sd_path, prompts, out, moved)) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status"] == "complete" and manifest["generated"] == 2
    assert len(read_index(out)) == 3
    # another LoRA (other bytes) under the same path: refused
    from safetensors.torch import load_file, save_file

    weights = load_file(moved)
    save_file({k: v * 2 for k, v in weights.items()}, moved)
    capsys.readouterr()
    assert main(argv(tiny_sd_path, prompts, out, moved)) == 2
    assert "lora_sha256" in capsys.readouterr().err
    # other prompts in the same places: refused
    prompts.write_text("a red circle\na yellow car\na green tree\n")
    capsys.readouterr()
    assert main(argv(tiny_sd_path, prompts, out, lora_file)) == 2
    assert "prompt 1" in capsys.readouterr().err


def test_truncated_last_index_line_is_tolerated(tmp_path):
    rows = [{"prompt": p, "prompt_index": i, "seed": 0, "file": f"images/{i:05d}_0.png"} for i, p in enumerate(PROMPTS)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "index.jsonl").write_text(text[:-15])  # a write cut short in the last row
    with pytest.warns(UserWarning, match="truncated last line ignored"):
        assert read_index(tmp_path) == rows[:2]
    lines = text.splitlines()
    lines[0] = lines[0][:-3]  # a broken row that is not the last: an error naming the line
    (tmp_path / "index.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        read_index(tmp_path)
