"""The gold guard in `ncppo train`: gold scored on held-out prompts every --gold-every steps beside
the proxy, logged, the best step kept in best/, and --stop-on-gold-drop ending the run with the
best step's weights as the result. The gold scores here are scripted (a user's module:callable
scorer), so the decisions are exact; tests/test_reward_hacking.py shows the guard on real reward hacking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ncppo.cli import main
from test_cli_errors import fails

HERE = Path(__file__).resolve()


class ScriptedGold:
    """Gold scores by evaluation: the k-th call scores every image SCRIPT[k] (steps 0, 2, 4, ...)."""

    SCRIPT = [5.0, 6.0, 7.0, 6.5, 5.0, 4.0, 3.0]

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts):
        value = self.SCRIPT[min(self.calls, len(self.SCRIPT) - 1)]
        self.calls += 1
        return [value] * len(images)


def brightness(images, prompts):
    import numpy as np

    return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255) for im in images]


@pytest.fixture
def guard_argv(tiny_sd_path, pairs_parquet, tmp_path):
    prompts = tmp_path / "held-out.txt"
    prompts.write_text("a red circle on a white background\na blue square on a black background\n")

    def argv(out, *extra):
        return ["train", "--model", str(tiny_sd_path), "--data", str(pairs_parquet), "--output-dir", str(out),
                "--resolution", "32", "--batch-size", "2", "--lora-rank", "4", "--max-steps", "12",
                "--learning-rate", "1e-2", "--report-to", "none", "--checkpoint-every", "2", "--log-every", "1",
                "--space", "latent", "--eval-prompts", str(prompts), "--eval-scorer", f"{HERE}:brightness",
                "--gold-scorer", f"{HERE}:ScriptedGold", "--gold-every", "2", "--sample-steps", "2",
                "--guidance-scale", "1", *extra]

    return argv


def _eval_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "eval"]


def test_the_guard_stops_at_the_drop_and_keeps_the_best_steps_weights(guard_argv, tmp_path):
    out = tmp_path / "guarded"
    assert main(guard_argv(out, "--stop-on-gold-drop", "1.5")) == 0  # a guard stop is a result, exit 0
    manifest = json.loads((out / "manifest.json").read_text())
    # gold 5, 6, 7, 6.5, 5 at steps 0..8: 5 <= 7 - 1.5 at step 8
    assert manifest["steps"] == 8 and "gold score 5 at step 8" in manifest["stopped_early"]
    assert manifest["best"] == {"dir": "best", "step": 4, "gold_score": 7.0,
                                "proxy_score": pytest.approx(manifest["eval_history"][2]["mean_score"]),
                                "is_result": True}
    best = load_file(out / "best" / "pytorch_lora_weights.safetensors")
    at_step_4 = load_file(out / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    last = load_file(out / "checkpoint-8" / "pytorch_lora_weights.safetensors")
    result = load_file(out / "pytorch_lora_weights.safetensors")
    assert all((best[k] == at_step_4[k]).all() and (result[k] == best[k]).all() for k in best)
    assert any((last[k] != best[k]).any() for k in best)  # the result is not the last step's
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 4
    rows = _eval_rows(out)
    assert [(r["step"], r["gold_score"], r["gold_best"]) for r in rows] == [
        (0, 5.0, 5.0), (2, 6.0, 6.0), (4, 7.0, 7.0), (6, 6.5, 7.0), (8, 5.0, 7.0)]
    assert all("proxy_score" in r for r in rows)
    card = (out / "README.md").read_text()
    assert "best gold score 7 at step 4" in card and "these weights are that step's" in card


def test_without_the_guard_the_run_goes_on_and_its_weights_are_the_last(guard_argv, tmp_path):
    out = tmp_path / "unguarded"
    assert main(guard_argv(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 12 and manifest["stopped_early"] is None
    assert manifest["best"]["step"] == 4 and manifest["best"]["is_result"] is False
    assert [r["gold_score"] for r in _eval_rows(out)] == [5.0, 6.0, 7.0, 6.5, 5.0, 4.0, 3.0]
    result = load_file(out / "pytorch_lora_weights.safetensors")
    best = load_file(out / "best" / "pytorch_lora_weights.safetensors")
    assert any((result[k] != best[k]).any() for k in best)


def test_a_resumed_stopped_run_stays_stopped(guard_argv, tmp_path):
    out = tmp_path / "again"
    assert main(guard_argv(out, "--stop-on-gold-drop", "1.5")) == 0
    before = (out / "pytorch_lora_weights.safetensors").read_bytes()
    assert main(guard_argv(out, "--stop-on-gold-drop", "1.5", "--resume", "latest")) == 0
    assert json.loads((out / "manifest.json").read_text())["steps"] == 8
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == before


def test_gold_flags_are_checked(guard_argv, tmp_path, capsys):
    out = tmp_path / "bad"
    fails(capsys, guard_argv(out, "--gold-scorer", f"{HERE}:brightness"), "--gold-scorer", "also --eval-scorer")
    fails(capsys, [a for a in guard_argv(out, "--stop-on-gold-drop", "1") if a != "--gold-scorer"
                   and a != f"{HERE}:ScriptedGold"], "--stop-on-gold-drop needs --gold-scorer")
    fails(capsys, guard_argv(out, "--stop-on-gold-drop", "-1"), "--stop-on-gold-drop must be > 0")
