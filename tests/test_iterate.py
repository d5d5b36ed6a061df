"""`ncppo iterate` on a tiny SD pipeline: rounds continue the same LoRA, --reference previous starts
each round at the previous policy (DPO at ln 2), a run killed at any moment and rerun ends
bit-equal to an uninterrupted one, and bad input is one line through the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ncppo.cli import main
from test_cli_errors import fails

HERE = Path(__file__).resolve()
TRAIN = ["a red circle on a white background", "a blue square on a black background",
         "a green triangle on a gray background"]
HELD_OUT = ["a yellow circle on a black background", "a red square on a gray background"]


def brightness(images, prompts):
    """The labelling (proxy) reward of these tests: mean brightness."""
    return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255) for im in images]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("iterate-prompts")
    (root / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "eval.txt").write_text("\n".join(HELD_OUT) + "\n")
    return root


def iterate_argv(model, prompts: Path, out, *extra):
    return ["iterate", "--model", str(model), "--prompts", str(prompts / "train.txt"),
            "--eval-prompts", str(prompts / "eval.txt"), "--out", str(out), "--rounds", "2", "--per-prompt", "3",
            "--scorer", f"{HERE}:brightness", "--gold-scorer", "toy-judge", "--pairs", "all", "--min-margin", "0",
            "--max-steps", "3", "--batch-size", "2", "--resolution", "32", "--lora-rank", "4", "--learning-rate", "1e-2",
            "--sample-steps", "2", "--guidance-scale", "1", "--report-to", "none", "--checkpoint-every", "1",
            "--space", "latent", "--eval-seeds", "0,1", "--sample-batch-size", "9", "--log-every", "1", *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd_path, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("iterate") / "whole"
    assert main(iterate_argv(tiny_sd_path, prompt_files, out, "--reference", "previous")) == 0
    return out


def test_rounds_continue_the_lora_against_the_previous_policy(uninterrupted):
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    round0 = json.loads((uninterrupted / "round-0" / "run" / "manifest.json").read_text())
    round1 = json.loads((uninterrupted / "round-1" / "run" / "manifest.json").read_text())
    assert round0["config"]["init_lora"] is None and round0["config"]["reference_lora"] is None
    assert round1["config"]["init_lora"] == round1["config"]["reference_lora"] == summary["rounds"][0]["lora"]
    # Round 1 starts at the previous policy, which is also its reference: a zero margin, DPO at ln 2.
    first = next(r for r in _rows(uninterrupted / "round-1" / "run" / "metrics.jsonl") if "loss" in r)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Round 1 samples its candidates from round 0's policy, with its own seeds.
    gen1 = json.loads((uninterrupted / "round-1" / "pairs" / "manifest.json").read_text())
    assert gen1["lora"] == summary["rounds"][0]["lora"] and gen1["seeds"] == [3, 4, 5]
    for r in summary["rounds"]:
        scores = r["eval"]["scores"]
        assert set(scores) == {f"{HERE}:brightness", "toy-judge"}
        lo, hi = r["eval"]["win_rate_vs_base"]["toy-judge"]["ci95"]
        assert 0 <= lo <= r["eval"]["win_rate_vs_base"]["toy-judge"]["win_rate"] <= hi <= 1
    assert summary["best"]["round"] in ("base", 0, 1)
    assert (uninterrupted / "summary.png").stat().st_size > 1000
    assert "toy-judge (gold)" in (uninterrupted / "summary.md").read_text()


def _run(argv, log: Path, env=None):
    with open(log, "a") as fh:  # a file, not a pipe: progress bars would fill a pipe nobody reads
        return subprocess.Popen([sys.executable, "-m", "ncppo", *argv], env={**os.environ, **(env or {})},
                                stdout=fh, stderr=subprocess.STDOUT)


def test_killed_twice_and_rerun_equals_the_uninterrupted_run(tiny_sd_path, prompt_files, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    argv = iterate_argv(tiny_sd_path, prompt_files, out, "--reference", "previous")
    # 1. SIGKILL inside round 0's training, while its step-2 checkpoint is being saved.
    log = tmp_path / "log.txt"
    proc = _run(argv, log, env={"NCPPO_TEST_FAULT": "kill:save-state:2"})
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert not (out / "round-0" / "round.json").exists()
    # 2. SIGKILL while round 1 samples its candidates.
    proc = _run(argv, log)
    images = out / "round-1" / "pairs" / "candidates" / "images"
    deadline = time.time() + 600
    while not list(images.glob("*.png")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (out / "round-0" / "round.json").exists() and not (out / "round-1" / "round.json").exists()
    # 3. The same command again finishes.
    assert main(argv) == 0
    from safetensors.torch import load_file

    from ncppo.evaluate.sample import lora_sha256

    for r in (0, 1):
        a, b = (d / f"round-{r}" / "run" / "pytorch_lora_weights.safetensors" for d in (out, uninterrupted))
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f"round {r} differs"
        assert lora_sha256(str(a)) == lora_sha256(str(b))  # tensors and metadata, whatever the header order
    killed = json.loads((out / "summary.json").read_text())
    whole = json.loads((uninterrupted / "summary.json").read_text())
    assert [r["eval"]["scores"] for r in killed["rounds"]] == [r["eval"]["scores"] for r in whole["rounds"]]


def test_bad_inputs_are_one_line(tiny_sd_path, prompt_files, tmp_path, capsys):
    out = tmp_path / "bad"
    fails(capsys, iterate_argv(tiny_sd_path, prompt_files, out, "--gold-scorer", f"{HERE}:brightness"),
          "--gold-scorer", "also a labelling --scorer")
    overlap = tmp_path / "overlap.txt"
    overlap.write_text(TRAIN[1] + "\n" + HELD_OUT[0] + "\n")
    fails(capsys, iterate_argv(tiny_sd_path, prompt_files, out, "--eval-prompts", str(overlap)),
          "share 1 prompt", TRAIN[1])
    fails(capsys, iterate_argv(tiny_sd_path, prompt_files, out, "--per-prompt", "1"), "--per-prompt", ">= 2")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.txt").write_text("\n")
    (empty / "eval.txt").write_text(HELD_OUT[0] + "\n")
    fails(capsys, iterate_argv(tiny_sd_path, empty, out), "train.txt", "no prompts")
    fails(capsys, [a for a in iterate_argv(tiny_sd_path, prompt_files, out)
                   if a not in ("--eval-prompts", str(prompt_files / "eval.txt"))], "held-out --eval-prompts")
    assert not out.exists() or not any(out.glob("round-*"))


def test_a_rerun_with_other_settings_is_refused(tiny_sd_path, prompt_files, uninterrupted, capsys):
    fails(capsys, iterate_argv(tiny_sd_path, prompt_files, uninterrupted, "--reference", "base"),
          "other settings", "--reference")


def test_the_round_guard_stops_and_keeps_the_best_round(tiny_sd_path, prompt_files, tmp_path):
    """Gold is scripted by evaluation (tests/test_gold_guard.py's ScriptedGold: base 5, then 6, 7, 6.5, ...):
    with --stop-on-gold-drop 0.4 the rounds end after round 2 (6.5 <= 7 - 0.4), round 3 never runs, and
    best/ holds round 1's LoRA."""
    out = tmp_path / "guarded"
    gold = f"{HERE.parent / 'test_gold_guard.py'}:ScriptedGold"
    assert main(iterate_argv(tiny_sd_path, prompt_files, out, "--rounds", "4", "--gold-scorer", gold,
                             "--stop-on-gold-drop", "0.4")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2] and not (out / "round-3").exists()
    assert [r["eval"]["scores"][gold]["mean"] for r in summary["rounds"]] == [6.0, 7.0, 6.5]
    assert summary["rounds"][2]["stop"] and "fell 0.4 or more below its best 7" in summary["stopped"]
    assert summary["best"] == {"round": 1, "lora": summary["rounds"][1]["lora"], "gold": 7.0}
    assert (out / "best" / "pytorch_lora_weights.safetensors").read_bytes() == Path(summary["rounds"][1]["lora"]).read_bytes()
    # rerunning the stopped command does not start round 3
    assert main(iterate_argv(tiny_sd_path, prompt_files, out, "--rounds", "4", "--gold-scorer", gold,
                             "--stop-on-gold-drop", "0.4")) == 0
    assert not (out / "round-3").exists()


def test_votes_add_human_pairs_to_a_round(tiny_sd_path, prompt_files, tmp_path):
    """--votes: `ncppo sbs serve` votes (majority per item, ties dropped) join round 0's generated pairs."""
    import pyarrow.parquet as pq

    from ncppo.sbs.server import ServeConfig, open_session
    from test_sbs_server import make_sample_folders

    dir_a, dir_b = make_sample_folders(tmp_path, seeds=(0,))
    votes = tmp_path / "votes.jsonl"
    session = open_session(ServeConfig(dir_a=str(dir_a), dir_b=str(dir_b), out=str(votes)))
    for k, winner in enumerate(("a", "b", "tie")):  # A wins item 0, B item 1, item 2 a tie
        item = session.items[k]
        side = "tie" if winner == "tie" else "left" if session.image("ann", item.key, "left") == (
            item.file_a if winner == "a" else item.file_b) else "right"
        session.vote("ann", item.key, "general", side)
    session.log.close()
    out = tmp_path / "with-votes"
    assert main(iterate_argv(tiny_sd_path, prompt_files, out, "--rounds", "1", "--votes", str(votes))) == 0
    rows = pq.read_table(out / "round-0" / "pairs" / "train-00000-of-00001.parquet").to_pylist()
    human = [r for r in rows if r["source"] == "votes"]
    assert [(r["caption"], r["label_0"]) for r in human] == [(session.items[0].prompt, 1.0), (session.items[1].prompt, 0.0)]
    assert human[0]["jpg_0"] == session.items[0].file_a.read_bytes()
    counts = json.loads((out / "round-0" / "pairs" / "manifest.json").read_text())["counts"]
    assert counts["extra_pairs"] == 2 and counts["rows"] == counts["pairs"] + 2


def test_warm_start_trains_first_and_round_0_samples_from_it(tiny_sd_path, prompt_files, pairs_parquet, tmp_path,
                                                             capsys):
    out = tmp_path / "warm"
    assert main(iterate_argv(tiny_sd_path, prompt_files, out, "--rounds", "1", "--warm-start", str(pairs_parquet))) == 0
    # progress bars name the step, the method and the round out of all rounds
    bars = capsys.readouterr().err
    for label in ("base eval: sampling", "warm start latent-DPO train", "warm start eval: sampling",
                  "round 0 (1/1) generate: sampling", "round 0 (1/1) generate: scoring", "round 0 (1/1) latent-DPO train",
                  "round 0 (1/1) eval: sampling"):
        assert label in bars, label
    summary = json.loads((out / "summary.json").read_text())
    warm = summary["rounds"][0]
    assert warm["round"] == "warm-start" and warm["lora"] == str(out / "warm-start" / "run" / "pytorch_lora_weights.safetensors")
    assert json.loads((out / "round-0" / "pairs" / "manifest.json").read_text())["lora"] == warm["lora"]
    assert json.loads((out / "round-0" / "run" / "manifest.json").read_text())["config"]["init_lora"] == warm["lora"]
    assert "| warm-start |" in (out / "summary.md").read_text()
