"""The DiT rows of the benchmarks run (tiny sizes): step_cost through the adapters on the CPU and on the
meta device (FLOPs only), and dit_precision's table."""

import argparse
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("single_thread")

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import dit_precision
    import step_cost

    yield step_cost, dit_precision
    for name in ("step_cost", "dit_precision"):
        sys.modules.pop(name, None)


def _args(**kw):
    values = dict(size="tiny-flux", variant="ncp", device="cpu", dtype="fp32", iters=1, warmup=0, threads=1,
                  dit_blocks=None, resolution=None)
    return argparse.Namespace(**{**values, **kw})


def test_step_cost_dit_rows(bench):
    step_cost, _ = bench
    rows = {v: step_cost.worker(_args(variant=v)) for v in ("latent", "ncp")}
    assert rows["ncp"]["blocks"] == "4 blocks, NCP through 1" and rows["ncp"]["time_s"] > 0
    assert rows["ncp"]["flops"] > rows["latent"]["flops"] > 0  # the encoder passes cost FLOPs
    meta = step_cost.worker(_args(size="sd35m", device="meta", dit_blocks=2))  # SD3.5-medium widths, 2 blocks
    assert meta["blocks"] == "2 blocks, NCP through 1" and meta["flops"] > 1e12 and math.isnan(meta["time_s"])


def test_dit_precision_table(bench, capsys):
    _, dit_precision = bench
    dit_precision.LEVELS = (500,)
    dit_precision.main(["--model", "tiny-sd3", "--pairs", "1"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 500 ")][-1]
    cells = [float(c) for c in row.strip("|").split("|")[4:]]  # bf16 native, bf16 scaled, fp16 ..., fp32 scaled
    assert cells[0] > 1.0 and cells[1] < 0.05
