"""Two CPU processes (torchrun + accelerate): metrics are the mean over ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_processes_metrics_are_mean_over_ranks(tiny_sd_path, pairs_parquet, tmp_path):
    out = tmp_path / "ddp"
    # `accelerate launch --cpu` starts one process on a machine without a GPU; torchrun starts two
    # and accelerate picks them up from the environment exactly as under `accelerate launch`.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ncppo", "train", "--model", str(tiny_sd_path), "--data", str(pairs_parquet),
           "--output-dir", str(out), "--resolution", "32", "--batch-size", "1", "--lora-rank", "4",
           "--max-steps", "2", "--report-to", "none", "--checkpoint-every", "0", "--log-every", "1",
           "--space", "ncp", "--beta", "100000", "--log-rank-metrics", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def read(name):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    merged, rank0, rank1 = read("metrics.jsonl"), read("metrics_rank0.jsonl"), read("metrics_rank1.jsonl")
    assert [m["step"] for m in merged] == [1, 2]
    # The ranks saw different pairs: their errors differ (the step-1 loss does not: the LoRA starts at
    # zero, so policy == reference and the loss is ln 2 on every rank).
    assert rank0[0]["ref_err_w"] != rank1[0]["ref_err_w"]
    assert rank0[0]["loss"] == rank1[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
    for m, a, b in zip(merged, rank0, rank1):
        for key in ("loss", "implicit_acc", "policy_err_w", "ref_err_l"):
            assert m[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-6, abs=1e-12), key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2
