"""The prepared GPU script runs its whole path on the CPU (`--small`): setup, `ncppo data cache`,
`ncppo train` through the cache, FLOP counting, the step-1 values and the precision table."""

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_gpu_train_small_runs_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_train

    gpu_train.main(["--small", "--out", str(tmp_path), "--runs", "ncp / cache", "--steps", "2",
                    "--precision-timesteps", "100"])
    results = json.loads((tmp_path / "results.json").read_text())
    run = results["runs"]["ncp / cache"]
    # LoRA starts at zero, so policy == reference: bit-equal errors give exactly these, in CPU bf16 autocast
    assert run["step1_loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert run["step1_acc"] == 0.5 and run["step1_margin"] == 0.0
    assert run["flops_per_step"] > 0 and run["sec_per_step"] > 0
    (row,) = results["precision"]
    assert row["t"] == 100 and row["bf16 scaled"] < 0.1 < row["bf16 native"]
    sys.modules.pop("gpu_train", None)


def test_generate_speed_small_runs_on_the_cpu(tmp_path, monkeypatch):
    """benchmarks/generate_speed.py's whole path (sampling, PickScore-path and judge scoring, one
    end-to-end data generate) on the toy base, with a tiny random CLIP."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import generate_speed

    result = generate_speed.main(["--small", "--out", str(tmp_path), "--prompts", "2", "--per-prompt", "2",
                                  "--steps", "2", "--batch-size", "4"])
    rows = result["throughput"]
    assert rows["sampling"]["images_per_s"] > 0 and result["images"] == 4
    assert 0 < rows["pickscore (architecture)"]["share_of_generate"] < 1
    timings = json.loads((tmp_path / "results.json").read_text())["generate_manifest_timings"]
    assert timings["sampling_s"] > 0 and timings["s_per_pair"] > 0
    sys.modules.pop("generate_speed", None)
