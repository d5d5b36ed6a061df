"""Crash safety of `ncppo train`: real SIGKILLs (inside a checkpoint save and at an arbitrary
moment), then `--resume latest`, end bit-equal to an uninterrupted run; a corrupt newest
checkpoint is skipped with a warning; a changed run is refused; a full disk on the main process
stops every process with the previous checkpoint intact.

The runs are subprocesses (`python -m ncppo train`) with OMP_NUM_THREADS=1 so that every run
uses the same kernels; kills inside a save use the test-only NCPPO_TEST_FAULT hook of
`ncppo.train.checkpoint`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ncppo.train import checkpoint as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop(ckpt.TEST_FAULT_ENV, None)
MAX_STEPS = 8
WEIGHTS = "pytorch_lora_weights.safetensors"


def train_args(model, data, out, *extra) -> list[str]:
    """Workers, random crops and flips, a warmup + cosine schedule, gradient accumulation that
    straddles epochs (5 pairs, 1 pair per micro-step, 2 micro-steps per step), a checkpoint every
    step and only the newest two kept; the same command for every (re)start."""
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--resolution", "32",
            "--batch-size", "1", "--gradient-accumulation-steps", "2", "--lora-rank", "4", "--max-steps",
            str(MAX_STEPS), "--learning-rate", "1e-3", "--report-to", "none", "--log-every", "1", "--space", "ncp",
            "--beta", "1e5", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2", "--dataloader-num-workers", "2",
            "--hflip", "true", "--crop", "random", "--checkpoint-every", "1", "--checkpoints-total-limit", "2",
            "--resume", "latest", *extra]


def run(args, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(ENV, **({ckpt.TEST_FAULT_ENV: fault} if fault else {}))
    return subprocess.run([sys.executable, "-m", "ncppo", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_and_kill_after_step(args, step: int, timeout: int = 300) -> int:
    """Start `ncppo *args`, SIGKILL it as soon as metrics.jsonl records `step`; returns the exit code."""
    metrics = Path(args[args.index("--output-dir") + 1]) / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ncppo", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and f'"step": {step},' in metrics.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    return proc.wait(timeout=60)


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture
def one_thread():
    """The in-process run uses the kernels of the OMP_NUM_THREADS=1 subprocesses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_latest_is_bit_exact(tiny_sd_path, pairs_parquet, tmp_path, one_thread, capsys):
    from ncppo.cli import main

    assert main(train_args(tiny_sd_path, pairs_parquet, tmp_path / "full")) == 0  # uninterrupted
    assert "no checkpoint in" in capsys.readouterr().out  # --resume latest on a fresh folder says so

    out = tmp_path / "killed"
    args = train_args(tiny_sd_path, pairs_parquet, out)
    # 1. killed inside the save of step 3: files and trainer_state.json written, not yet renamed
    assert run(args, fault="kill:save-written:3").returncode == -signal.SIGKILL
    assert (out / ".tmp-checkpoint-3" / ckpt.STATE_FILE).is_file()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    # 2. resumed from 2 (the stale folder removed), killed from outside once step 5 was logged,
    # at whatever it was doing (saving checkpoint-5 or computing step 6)
    assert run_and_kill_after_step(args, 5) in (-signal.SIGKILL, 0)
    assert not (out / ".tmp-checkpoint-3").exists()
    # 3. resumed, killed right after checkpoint-7 was renamed, before the older ones were pruned
    assert run(args, fault="kill:save-renamed:7").returncode == -signal.SIGKILL
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-5", "checkpoint-6", "checkpoint-7"]
    # 4. checkpoint-7 then rots on disk (same size, other bytes): `latest` skips it naming it,
    # resumes from checkpoint-6 and runs to the end
    rotten = out / "checkpoint-7"
    data = bytearray((rotten / ckpt.LORA_FILE).read_bytes())
    data[-8:] = bytes(8 - i for i in range(8))
    (rotten / ckpt.LORA_FILE).write_bytes(bytes(data))
    done = run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipping {rotten}: {ckpt.LORA_FILE} does not match its saved SHA-256" in done.stderr
    assert f"resumed from {out / 'checkpoint-6'} at step 6" in done.stdout

    assert max_weight_diff(out, tmp_path / "full") == 0.0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1))  # no step twice after four starts
    assert [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))] == []
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-7", "checkpoint-8"]
    assert ckpt.verify_checkpoint(rotten) is None  # saved again, whole

    # 5. The same folder with another batch size is another run: refused before any model loads,
    # in one line naming the difference.
    capsys.readouterr()
    assert main([*args, "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ncppo train: error: --resume latest: checkpoint-8 was saved "
                                                   "by another run (batch_size 1 there, 2 now)")
    assert "--resume-anyway" in err


def _tiny_checkpoint(folder: Path, files: dict[str, bytes], **state) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    record = {name: [len(data), ckpt._sha256(folder / name)] for name, data in files.items()}
    (folder / ckpt.STATE_FILE).write_text(json.dumps({"step": 1, "files": record, **state}))
    return folder


def test_verify_names_what_is_wrong_and_clean_stale_restores(tmp_path):
    good = _tiny_checkpoint(tmp_path / "checkpoint-1", {"a.bin": b"abc", "b.bin": b"12345"})
    assert ckpt.verify_checkpoint(good) is None
    (good / "b.bin").write_bytes(b"1234")
    assert ckpt.verify_checkpoint(good) == "b.bin has 4 bytes, 5 were saved"
    (good / "b.bin").write_bytes(b"12346")
    assert "b.bin does not match its saved SHA-256" in ckpt.verify_checkpoint(good)
    (good / "a.bin").unlink()
    assert ckpt.verify_checkpoint(good) == "a.bin is missing"
    bare = tmp_path / "checkpoint-2"
    bare.mkdir()
    assert "incomplete checkpoint" in ckpt.verify_checkpoint(bare)
    (bare / ckpt.STATE_FILE).write_text('{"step": 2, "fil')
    assert "unreadable" in ckpt.verify_checkpoint(bare)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path, complete_only=False)] == ["checkpoint-1", "checkpoint-2"]

    # a kill between the two renames of `publish` leaves .old-<name> and no <name>: put back
    (tmp_path / ".old-pytorch_lora_weights.safetensors").write_bytes(b"w")
    (tmp_path / ".tmp-checkpoint-3").mkdir()
    (tmp_path / ".old-unet").mkdir()
    (tmp_path / "unet").mkdir()
    removed = ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == [".old-unet", ".tmp-checkpoint-3"]
    assert (tmp_path / "pytorch_lora_weights.safetensors").read_bytes() == b"w"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_identity_differences_and_rewind_logs(tmp_path):
    saved = {"batch_size": 4, "processes": 2, "data_fingerprint": "abc", "model": "m"}
    now = {"batch_size": 4, "processes": 1, "data_fingerprint": "abd", "model": "m"}
    assert ckpt.identity_differences(saved, now) == ["processes 2 there, 1 now",
                                                     "data_fingerprint 'abc' there, 'abd' now"]
    assert ckpt.identity_differences(None, now) == []  # a checkpoint from before identities were saved
    assert ckpt.identity_differences({"seed": 0}, {"seed": 1}) == ["seed 0 there, 1 now"]  # another data order
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    ckpt.rewind_logs(tmp_path, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_full_disk_on_the_main_process_stops_every_process(tiny_sd_path, pairs_parquet, tmp_path):
    """Two gloo processes; the main process fails to write checkpoint-2: both exit with the one-line
    error (no process left waiting in a barrier) and checkpoint-1 is intact."""
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ncppo",
         "train", "--model", str(tiny_sd_path), "--data", str(pairs_parquet), "--output-dir", str(out),
         "--resolution", "32", "--batch-size", "1", "--lora-rank", "4", "--max-steps", "3", "--report-to", "none",
         "--checkpoint-every", "1", "--space", "latent"],
        env=dict(ENV, **{ckpt.TEST_FAULT_ENV: "enospc:save-state:2"}), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "ncppo train: error:" in line]
    assert len(errors) == 2, proc.stderr[-3000:]  # one line from each process, no traceback
    assert all("saving checkpoint-2 failed" in e and "checkpoint-1 is intact" in e for e in errors)
    assert any("(OSError: [Errno 28] No space left on device" in e for e in errors)
    assert "ncppo/train/" not in proc.stderr  # no traceback from ncppo (torchrun prints its own)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert ckpt.verify_checkpoint(out / "checkpoint-1") is None
    assert not (out / ".tmp-checkpoint-2").exists()


def test_another_lora_alpha_is_another_run():
    from ncppo.train.config import TrainConfig

    def identity(**overrides):
        config = TrainConfig(model="m", data="d", output_dir="o", lora_rank=4, **overrides)
        return ckpt.run_identity(config, processes=1, data_fingerprint="f", pairs=10)

    saved = identity()  # alpha defaults to the rank
    assert ckpt.identity_differences(saved, identity(lora_alpha=4.0)) == []
    assert ckpt.identity_differences(saved, identity(lora_alpha=8.0)) == ["lora_alpha 4 there, 8.0 now"]
