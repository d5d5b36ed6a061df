"""Every expected failure through the CLI: one line `ncppo <command>: error: ...` naming the flag,
file, row or column, exit code 2, no traceback; `--debug` shows the traceback instead."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ncppo.cli import main
from ncppo.errors import InputError
from ncppo.train import checkpoint as ckpt


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run `ncppo *argv`: exit code 2, exactly one error line holding every needle, no traceback."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    command = argv[0] if argv[0] != "data" else f"data {argv[1]}"
    lines = [line for line in err.splitlines() if line.startswith(f"ncppo {command}: error: ")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def train_argv(tiny_sd_path, pairs_parquet, tmp_path):
    def argv(*extra, model=tiny_sd_path, data=pairs_parquet):
        return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                "--resolution", "32", "--batch-size", "1", "--lora-rank", "4", "--max-steps", "1",
                "--report-to", "none", "--checkpoint-every", "0", "--space", "latent", *extra]

    return argv


@pytest.fixture(scope="module")
def broken_models(tiny_sd_path, tmp_path_factory):
    """Copies of the tiny pipeline: without unet/, without U-Net weights, with truncated U-Net
    weights, of another pipeline class."""
    root = tmp_path_factory.mktemp("broken-models")
    made = {}
    for name in ("no_unet", "no_weights", "truncated", "other_class"):
        made[name] = shutil.copytree(tiny_sd_path, root / name)
    shutil.rmtree(made["no_unet"] / "unet")
    for f in (made["no_weights"] / "unet").glob("*.safetensors"):
        f.unlink()
    for f in (made["truncated"] / "unet").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:1000])
    index = json.loads((made["other_class"] / "model_index.json").read_text())
    index["_class_name"] = "KandinskyV22Pipeline"
    (made["other_class"] / "model_index.json").write_text(json.dumps(index))
    return made


def test_model_folder_missing_partial_or_unsupported(capsys, train_argv, broken_models, tmp_path):
    fails(capsys, train_argv(model=tmp_path / "nope"), f"--model {tmp_path / 'nope'}: no such folder")
    fails(capsys, train_argv(model=broken_models["no_unet"]), "partial pipeline folder: unet/ is missing")
    fails(capsys, train_argv(model=broken_models["no_weights"]), "partial pipeline folder: unet/ has no weights file")
    fails(capsys, train_argv(model=broken_models["truncated"]), "--model", "cannot load",
          "unet/diffusion_pytorch_model.safetensors")
    fails(capsys, train_argv(model=broken_models["other_class"]), "unsupported pipeline class 'KandinskyV22Pipeline'")


def test_data_missing_columns_unreadable_or_too_few_pairs(capsys, train_argv, broken_models, pair_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "no-label"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k not in ("label_0", "label_1")}
                                         for r in pair_rows]), folder / "train-0.parquet")
    fails(capsys, train_argv(data=folder), "missing column 'label_0'")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    fails(capsys, train_argv(data=garbage), str(garbage), "not a readable parquet file")
    fails(capsys, train_argv(data=tmp_path / "absent"), f"no such file or folder: {tmp_path / 'absent'}")
    fails(capsys, ["data", "check", str(tmp_path / "absent")], "no such file or folder")
    # 5 usable pairs (one tie dropped) do not fill a batch of 6; said before any model loads (this
    # model folder has no U-Net weights, so loading it would have failed with another message)
    fails(capsys, train_argv("--batch-size", "6", model=broken_models["no_weights"]),
          "5 usable pair(s), fewer than one batch (--batch-size 6 x 1 process(es) = 6)")


def test_half_written_latent_cache(capsys, train_argv, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(2, 2, 4, 4, 4)}, cache / "shard-p0-00000.safetensors")
    fails(capsys, train_argv(data=cache), "half-written latent cache", "cache_info.json")


def test_bad_flags_and_unknown_yaml_keys(capsys, train_argv, tiny_sd_path, tmp_path):
    fails(capsys, train_argv("--beta", "nan"), "--beta must be a finite number, got nan")
    fails(capsys, train_argv("--learning-rate", "-1"), "--learning-rate must be > 0, got -1")
    fails(capsys, train_argv("--weight-decay", "-0.1"), "--weight-decay must be >= 0")
    fails(capsys, train_argv("--max-train-samples", "0"), "--max-train-samples must be >= 1")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rte: 0.001\n")
    fails(capsys, train_argv("--config", str(yaml_file)), "unknown key 'learning_rte'")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    fails(capsys, ["sample", "--model", str(tiny_sd_path), "--prompts", str(prompts), "--out", str(tmp_path / "s"),
                   "--guidance", "inf"], "--guidance must be a finite number")


def test_sample_empty_prompts_and_lora_that_misses_the_unet(capsys, tiny_sd_path, tmp_path):
    from safetensors.torch import save_file

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    base = ["sample", "--model", str(tiny_sd_path), "--out", str(tmp_path / "s"), "--steps", "1", "--height", "32",
            "--width", "32"]
    fails(capsys, [*base, "--prompts", str(empty)], f"{empty}: no prompts")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    # a LoRA that adapts only the text encoder: diffusers merely logs that no U-Net key matched
    lora = tmp_path / "text_only.safetensors"
    key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.ones(4, 32), f"{key}.lora_B.weight": torch.ones(32, 4)}, lora)
    fails(capsys, [*base, "--prompts", str(prompts), "--lora", str(lora)], f"--lora {lora}",
          "none of its keys matches the unet")
    fails(capsys, [*base, "--prompts", str(prompts), "--lora", str(tmp_path / "absent.safetensors")],
          "no such file or folder")
    assert not (tmp_path / "s" / "images").exists() or not any((tmp_path / "s" / "images").iterdir())


def test_scorer_weights_missing(capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "samples"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "images" / "00000_0.png")
    (folder / "index.jsonl").write_text(json.dumps({"prompt": "a cat", "prompt_index": 0, "seed": 0,
                                                    "file": "images/00000_0.png"}) + "\n")
    fails(capsys, ["score", str(folder), "--scorer", "pickscore", "--scorer-path", str(tmp_path / "PickScore_v1")],
          f"pickscore scorer weights {tmp_path / 'PickScore_v1'}: no such file or folder")
    fails(capsys, ["score", str(tmp_path / "nothing-here")], "no sample index")


def test_fsdp_and_deepspeed_refused_naming_what_is_supported(capsys, train_argv, monkeypatch):
    for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        with monkeypatch.context() as m:
            m.setenv(env, "true")
            fails(capsys, train_argv(), f"{name} not supported", "one process, or DDP")


def test_checkpoint_failures(capsys, train_argv, tmp_path, monkeypatch):
    """A full disk while saving, a corrupt checkpoint, a LoRA that does not fit: one line each."""
    run = tmp_path / "run"
    # full disk while writing checkpoint-1: the error names it, nothing half-written stays behind
    with monkeypatch.context() as m:
        m.setenv(ckpt.TEST_FAULT_ENV, "enospc:save-state:1")
        fails(capsys, train_argv("--checkpoint-every", "1"), "saving checkpoint-1 failed",
              "No space left on device")
    assert not [p for p in run.iterdir() if p.name.startswith(("checkpoint-", ".tmp-"))]

    assert main(train_argv("--checkpoint-every", "1")) == 0
    good = run / "checkpoint-1"
    assert ckpt.verify_checkpoint(good) is None

    # a LoRA with missing keys never resumes silently from its initialisation, even with --resume-anyway
    fails(capsys, train_argv("--resume", str(good), "--resume-anyway", "--lora-targets", "to_q,to_k,to_v,to_out.0,proj_in",
                             "--max-steps", "2"),
          "does not fit this run's LoRA", "LoRA keys missing")
    # without --resume-anyway the changed LoRA shape is named before anything loads
    fails(capsys, train_argv("--resume", "latest", "--lora-rank", "8", "--max-steps", "2"),
          "saved by another run (lora_rank 4 there, 8 now; lora_alpha 4 there, 8 now)")

    lora = good / ckpt.LORA_FILE
    lora.write_bytes(lora.read_bytes()[:-10])
    fails(capsys, train_argv("--resume", str(good), "--max-steps", "2"), f"--resume {good}: {ckpt.LORA_FILE} has")
    fails(capsys, train_argv("--resume", str(tmp_path / "nowhere")), "no such checkpoint folder")


def test_debug_shows_the_traceback(train_argv, tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        main(["--debug", *train_argv(model=tmp_path / "nope")])
    with pytest.raises(InputError, match="no such folder"):
        main([*train_argv(model=tmp_path / "nope"), "--debug"])


def test_an_os_error_the_command_did_not_name_is_one_line_too(capsys, pairs_parquet, tmp_path):
    """A folder where the report file must go: the OSError's own words, one line, exit 2."""
    taken = tmp_path / "taken"
    taken.mkdir()
    fails(capsys, ["data", "check", str(pairs_parquet), "--json", str(taken)], str(taken))
