"""`ncppo sample` and `sample_images` on the tiny SD pipeline (32x32, 2 steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ncppo.cli import main
from ncppo.evaluate.sample import (PromptSourceError, load_pipeline, read_index, read_prompts, sample_images)

PROMPTS = ["a red circle", "a blue square", "a green tree"]
COMMON = ["--steps", "2", "--height", "32", "--width", "32", "--guidance", "5"]


def _arr(image):
    return np.asarray(image, dtype=np.int16)


def assert_same_pixels(x, y):
    """Equal up to the float rounding of batched kernels: at most 1 level on under 1% of values."""
    d = np.abs(_arr(x) - _arr(y))
    assert d.max() <= 1 and (d > 0).mean() < 0.01, (d.max(), (d > 0).mean())


def _load_png(folder, row):
    from PIL import Image

    with Image.open(folder / row["file"]) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def prompts_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")  # a blank line is skipped
    return path


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_sd_path, prompts_txt):
    """One in-process CLI run: 3 prompts x seeds 0,1 at batch size 1."""
    out = tmp_path_factory.mktemp("samples") / "bs1"
    rc = main(["sample", "--model", str(tiny_sd_path), "--prompts", str(prompts_txt), "--out", str(out),
               "--seeds", "0,1", "--batch-size", "1", *COMMON])
    assert rc == 0
    return out


def test_sample_images_batch_3_equals_cli_batch_1(sampled, tiny_sd_path):
    pipe = load_pipeline(str(tiny_sd_path))
    rows = [r for r in read_index(sampled) if (r["prompt_index"], r["seed"]) in ((0, 1), (1, 0), (2, 1))]
    three = sample_images(pipe, [r["prompt"] for r in rows], [r["seed"] for r in rows], batch_size=3,
                          steps=2, guidance=5.0, height=32, width=32)
    assert [im.size for im in three] == [(32, 32)] * 3
    for r, im in zip(rows, three):
        assert_same_pixels(_load_png(sampled, r), im)
    # the seed matters: the same prompt with another seed is a different image
    seed_0 = next(r for r in read_index(sampled) if (r["prompt_index"], r["seed"]) == (0, 0))
    assert np.abs(_arr(_load_png(sampled, seed_0)) - _arr(three[0])).mean() > 5


def test_sample_cli_writes_index_and_manifest(sampled):
    rows = read_index(sampled)
    assert [(r["prompt_index"], r["seed"], r["prompt"]) for r in rows] == [
        (i, s, p) for i, p in enumerate(PROMPTS) for s in (0, 1)]
    assert all((sampled / r["file"]).is_file() for r in rows)
    assert rows[0]["settings"]["steps"] == 2 and rows[0]["settings"]["guidance"] == 5.0
    manifest = json.loads((sampled / "sample_manifest.json").read_text())
    assert manifest["config"]["seeds"] == [0, 1] and manifest["generated"] == 6
    assert manifest["environment"]["packages"]["diffusers"]


def test_two_processes_batch_3_match_one_process_batch_1(sampled, tiny_sd_path, prompts_txt, tmp_path):
    out = tmp_path / "two-procs"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # torchrun: `accelerate launch --cpu` starts one process (multi-CPU needs MPI); PartialState reads
    # torchrun's RANK / WORLD_SIZE exactly as it does under `accelerate launch --multi_gpu` on GPUs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ncppo", "sample",
           "--model", str(tiny_sd_path), "--prompts", str(prompts_txt), "--out", str(out), "--seeds", "0,1",
           "--batch-size", "3", *COMMON]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "sample_manifest.json").read_text())["num_processes"] == 2
    rows_1, rows_2 = read_index(sampled), read_index(out)
    assert [(r["prompt_index"], r["seed"], r["file"]) for r in rows_1] == [
        (r["prompt_index"], r["seed"], r["file"]) for r in rows_2]
    for r in rows_1:
        assert_same_pixels(_load_png(sampled, r), _load_png(out, r))


def test_resume_skips_existing_images_and_refuses_other_settings(sampled, tiny_sd_path, prompts_txt, capsys):
    files = sorted((sampled / "images").glob("*.png"))
    before = {f.name: f.stat().st_mtime_ns for f in files}
    victim = files[3]
    original = _arr(_load_png(sampled, {"file": f"images/{victim.name}"}))
    victim.unlink()
    args = ["sample", "--model", str(tiny_sd_path), "--prompts", str(prompts_txt), "--out", str(sampled),
            "--seeds", "0,1", "--batch-size", "2", *COMMON]
    assert main(args) == 0
    manifest = json.loads((sampled / "sample_manifest.json").read_text())
    assert manifest["generated"] == 1
    after = {f.name: f.stat().st_mtime_ns for f in sorted((sampled / "images").glob("*.png"))}
    assert {k: v for k, v in after.items() if k != victim.name} == {k: v for k, v in before.items() if k != victim.name}
    assert_same_pixels(original, _load_png(sampled, {"file": f"images/{victim.name}"}))
    capsys.readouterr()
    assert main([*args[:-len(COMMON)], "--steps", "3", "--height", "32", "--width", "32", "--guidance", "5"]) == 2
    assert "steps: 2 there, 3 now" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_file(tiny_sd_path, tmp_path_factory):
    """A LoRA on the tiny U-Net's attention projections with random (non-zero) B matrices."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_changes_the_samples_and_scale_zero_does_not(sampled, tiny_sd_path, prompts_txt, lora_file, tmp_path):
    base = read_index(sampled)[:2]
    outs = {}
    for scale in ("1", "0"):
        out = tmp_path / f"lora{scale}"
        assert main(["sample", "--model", str(tiny_sd_path), "--lora", str(lora_file), "--lora-scale", scale,
                     "--prompts", str(prompts_txt), "--max-prompts", "1", "--out", str(out), "--seeds", "0,1",
                     *COMMON]) == 0
        outs[scale] = out
        assert read_index(out)[0]["settings"]["lora"] == str(lora_file)
    for r in base:
        diff = np.abs(_arr(_load_png(outs["1"], r)) - _arr(_load_png(sampled, r))).mean()
        assert diff > 2, diff  # scale 1: pixels move by several levels on average
        assert_same_pixels(_load_png(outs["0"], r), _load_png(sampled, r))


def test_sdxl_pipeline_samples(tiny_sdxl_path):
    pipe = load_pipeline(str(tiny_sdxl_path), scheduler="euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    ims = sample_images(pipe, PROMPTS[:2], [0, 0], steps=2, guidance=5.0, height=32, width=32, batch_size=2)
    assert [im.size for im in ims] == [(32, 32)] * 2
    assert np.abs(_arr(ims[0]) - _arr(ims[1])).mean() > 0  # same seed, other prompt


def test_prompt_sources(tmp_path):
    import datasets

    (tmp_path / "p.csv").write_text("id,caption\n1,a cat\n2,a dog\n3,a cat\n")
    assert read_prompts(tmp_path / "p.csv") == ["a cat", "a dog", "a cat"]
    assert read_prompts(tmp_path / "p.csv", unique=True) == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a tree"}\n\n{"prompt": "a car"}\n')
    assert read_prompts(tmp_path / "p.jsonl", limit=1) == ["a tree"]
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\nbread, a cat\tFood\n")  # PartiPrompts.tsv layout
    assert read_prompts(tmp_path / "parti.tsv") == ["bread, a cat"]
    (tmp_path / "hps.json").write_text('["a house", "a dog"]')
    assert read_prompts(tmp_path / "hps.json") == ["a house", "a dog"]
    datasets.Dataset.from_dict({"Prompt": ["x y", "z"], "Category": ["a", "b"]}).save_to_disk(tmp_path / "ds")
    assert read_prompts(tmp_path / "ds") == ["x y", "z"]
    (tmp_path / "bad.csv").write_text("caption\na cat\n\n \n")
    with pytest.raises(PromptSourceError, match=r"bad.csv, row 3: empty"):
        read_prompts(tmp_path / "bad.csv")
    with pytest.raises(PromptSourceError, match="no column 'text'"):
        read_prompts(tmp_path / "p.csv", column="text")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(PromptSourceError, match="bad.jsonl, line 2"):
        read_prompts(tmp_path / "bad.jsonl")


def test_fewer_prompts_then_another_list_is_refused_at_the_first_differing_index(tiny_sd_path, tmp_path, capsys):
    """Run 1: 5 prompts; run 2: --max-prompts 2 (same --out); run 3: another list sharing the first
    2 prompts must not reuse images 2..4 made for run 1's prompts."""
    first = tmp_path / "first.txt"
    first.write_text("p0\np1\np2\np3\np4\n")
    other = tmp_path / "other.txt"
    other.write_text("p0\np1\nq2\nq3\nq4\n")
    out = tmp_path / "s"
    base = ["sample", "--model", str(tiny_sd_path), "--out", str(out), "--seeds", "0", "--batch-size", "5",
            "--steps", "1", "--height", "32", "--width", "32"]
    assert main([*base, "--prompts", str(first)]) == 0
    assert main([*base, "--prompts", str(first), "--max-prompts", "2"]) == 0
    manifest = json.loads((out / "sample_manifest.json").read_text())
    assert len(manifest["prompt_hashes"]) == 5  # merged, never shrunk
    capsys.readouterr()
    assert main([*base, "--prompts", str(other)]) == 2
    err = capsys.readouterr().err
    assert "prompt 2 differs" in err and "'q2'" in err and "Traceback" not in err
    # the same list again is still accepted, and nothing is regenerated
    assert main([*base, "--prompts", str(first)]) == 0
    assert json.loads((out / "sample_manifest.json").read_text())["generated"] == 0


def test_prompt_files_with_a_byte_order_mark_or_not_utf8(tmp_path):
    (tmp_path / "bom.csv").write_text("prompt\na cat\n", encoding="utf-8-sig")
    assert read_prompts(tmp_path / "bom.csv") == ["a cat"]
    (tmp_path / "bom.txt").write_text("a cat\n", encoding="utf-8-sig")
    assert read_prompts(tmp_path / "bom.txt") == ["a cat"]
    (tmp_path / "bom.jsonl").write_text('{"prompt": "a cat"}\n', encoding="utf-8-sig")
    assert read_prompts(tmp_path / "bom.jsonl") == ["a cat"]
    for name in ("latin1.txt", "latin1.csv", "latin1.jsonl", "latin1.json"):
        body = {"latin1.txt": "caf\xe9\n", "latin1.csv": "prompt\ncaf\xe9\n",
                "latin1.jsonl": '{"prompt": "caf\xe9"}\n', "latin1.json": '["caf\xe9"]'}[name]
        (tmp_path / name).write_text(body, encoding="latin-1")
        with pytest.raises(PromptSourceError, match=rf"{name}: not UTF-8"):
            read_prompts(tmp_path / name)
