"""The gold guard on real reward hacking (no scripted scores): the shipped toy base's own samples,
labelled by `toy-proxy` (the toy judge with a blind spot for oversized shapes), trained on with
NCP-DPO at a high learning rate. Without the guard the proxy rises while the gold judge falls from
its peak; with `--stop-on-gold-drop` the run stops and its result is the peak step's weights.
Removing the guard (or its stop) makes the guarded assertions fail. tests/test_gold_guard.py checks
the guard's decisions exactly with scripted gold; docs/online.md shows the same over rounds and
seeds.

Measured here (fp32 CPU, the same to 3 decimals with 1 and 2 torch threads): unguarded proxy 6.277 ->
6.879, gold 6.027 -> 6.159 (step 50) -> 4.957; guarded stop at step 100 (gold 5.100). The tightest
assertions hold by about 0.2 judge points (gold end vs peak - 1.0, and kept gold vs end + 1.0): a
real training trajectory, which another CPU's arithmetic can move; the margins are not rounding-sized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ncppo.cli import main

DROP = 0.5


def _evals(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "eval"]


@pytest.fixture(scope="module")
def proxy_pairs(tmp_path_factory) -> Path:
    """Round 0 of on-policy alignment against the proxy: 8 candidates per toy training prompt."""
    out = tmp_path_factory.mktemp("hacking") / "pairs"
    assert main(["data", "generate", "--model", "toy", "--prompts", "toy:train", "--out", str(out),
                 "--per-prompt", "8", "--scorer", "toy-proxy", "--pairs", "all", "--max-pairs-per-prompt", "8",
                 "--seed", "3", "--steps", "20", "--guidance", "3", "--batch-size", "32"]) == 0
    return out


def _train(data: Path, out: Path, *extra: str) -> Path:
    assert main(["train", "--model", "toy", "--data", str(data), "--output-dir", str(out), "--space", "ncp",
                 "--beta", "3", "--beta-normalize", "--resolution", "32", "--batch-size", "16", "--lora-rank", "8",
                 "--learning-rate", "3e-3", "--lr-scheduler", "constant", "--max-steps", "150",
                 "--report-to", "none", "--checkpoint-every", "1000", "--log-every", "25",
                 "--eval-prompts", "toy:eval", "--eval-seeds", "0,1,2,3", "--eval-scorer", "toy-proxy",
                 "--gold-scorer", "toy-judge", "--gold-every", "25", "--sample-steps", "20",
                 "--guidance-scale", "3", *extra]) == 0
    return out


@pytest.mark.slow
def test_the_guard_stops_real_reward_hacking_at_golds_peak(proxy_pairs, tmp_path):
    free = _evals(_train(proxy_pairs, tmp_path / "unguarded"))
    assert [r["step"] for r in free] == [0, 25, 50, 75, 100, 125, 150]
    proxy = [r["proxy_score"] for r in free]
    gold = [r["gold_score"] for r in free]
    peak = max(range(len(gold)), key=gold.__getitem__)
    # Reward hacking: the proxy ends above where it started, gold ends far below its peak and the base.
    assert proxy[-1] > proxy[0] + 0.2, proxy
    assert gold[-1] < gold[peak] - 2 * DROP and gold[-1] < gold[0] - DROP, gold

    run = _train(proxy_pairs, tmp_path / "guarded", "--stop-on-gold-drop", str(DROP))
    guarded = _evals(run)
    # The same trajectory until the guard fires, which it does before the end ...
    assert [r["gold_score"] for r in guarded] == pytest.approx(gold[:len(guarded)], abs=1e-6)
    stop = guarded[-1]
    assert stop["step"] < 150 and stop["gold_score"] <= max(r["gold_score"] for r in guarded) - DROP
    # ... and the result is the best step's weights: gold's peak so far, well above the unguarded end.
    best = json.loads((run / "best" / "best.json").read_text())
    best_gold = max(r["gold_score"] for r in guarded)
    assert best["step"] == next(r["step"] for r in guarded if r["gold_score"] == best_gold)
    assert best_gold > gold[-1] + 2 * DROP
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["best"]["step"] == best["step"]
    result = load_file(run / "pytorch_lora_weights.safetensors")
    kept = load_file(run / "best" / "pytorch_lora_weights.safetensors")
    assert result.keys() == kept.keys() and all(torch.equal(result[k], kept[k]) for k in result)
