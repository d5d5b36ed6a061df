"""`ncppo data generate`: scores combined and paired as documented (hand-computed), the dataset read
as it is by the pair readers, a user's module:callable scorer, NaN scores skipped and named, a full
disk that loses nothing, and every bad input as one line through the CLI."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ncppo.cli import main
from ncppo.data.generate import SHARD_NAME, combine_scores, make_pairs, soft_label
from test_cli_errors import fails

PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green triangle on a gray background"]


def brightness(images, prompts):
    """A user's reward function: mean brightness (0..1) of each image."""
    return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255) for im in images]


def nan_on_second(images, prompts):
    """A reward that cannot score some images: NaN for every image whose brightness rank is odd."""
    values = brightness(images, prompts)
    return [v if k % 2 == 0 else float("nan") for k, v in enumerate(values)]


HERE = Path(__file__).resolve()


# ------------------------------------------------------------------ labelling math, by hand

def test_zscore_is_centred_per_prompt_over_the_pooled_within_prompt_spread():
    groups = np.array([0, 0, 1, 1])
    raw = {"a": np.array([1.0, 3.0, 10.0, 14.0])}
    # centred: -1, 1, -2, 2; pooled sd = sqrt((1 + 1 + 4 + 4) / (4 - 2)) = sqrt(5)
    got = combine_scores(raw, {"a": 1.0}, groups, "zscore")
    s = math.sqrt(5)
    assert got == pytest.approx([-1 / s, 1 / s, -2 / s, 2 / s])


def test_weights_average_the_scorers_and_rank_and_raw_are_per_prompt():
    groups = np.array([0, 0, 0])
    raw = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([30.0, 20.0, 20.0])}
    rank = combine_scores(raw, {"a": 3.0, "b": 1.0}, groups, "rank")
    # a ranks 0, .5, 1; b ranks 1, .25, .25 (tie averaged); weighted (3a + b) / 4
    assert rank == pytest.approx([(0 + 1) / 4, (1.5 + 0.25) / 4, (3 + 0.25) / 4])
    assert combine_scores(raw, {"a": 3.0, "b": 1.0}, groups, "raw") == pytest.approx([33 / 4, 26 / 4, 29 / 4])


def test_a_non_finite_score_removes_the_candidate_from_every_pair():
    groups = np.array([0, 0, 0, 1, 1])
    raw = {"a": np.array([1.0, np.nan, 5.0, 2.0, 2.5]), "b": np.array([1.0, 1.0, 1.0, np.inf, 1.0])}
    combined = combine_scores(raw, {"a": 1.0, "b": 1.0}, groups, "raw")
    assert np.isnan(combined[[1, 3]]).all() and np.isfinite(combined[[0, 2, 4]]).all()
    pairs, counts = make_pairs(combined, groups, mode="all", min_margin=0.0, max_per_prompt=None)
    assert [(w, l) for w, l, _ in pairs] == [(2, 0)]
    assert counts == {"near_ties": 0, "prompts_without_pair": 1, "candidates_unscored": 2, "pairs": 1}


def test_best_worst_all_margins_near_ties_and_cap():
    groups = np.array([0, 0, 0, 0, 1, 1, 1])
    combined = np.array([0.0, 2.0, 0.5, 1.0, 3.0, 3.05, 3.0])
    pairs, counts = make_pairs(combined, groups, mode="best-worst", min_margin=0.1, max_per_prompt=None)
    assert pairs == [(1, 0, 2.0)]  # prompt 1: best 3.05 vs worst 3.0 is a near tie
    assert counts["near_ties"] == 1 and counts["prompts_without_pair"] == 1
    pairs, counts = make_pairs(combined, groups, mode="all", min_margin=0.4, max_per_prompt=None)
    assert [(w, l) for w, l, _ in pairs] == [(1, 0), (1, 2), (3, 0), (1, 3), (2, 0), (3, 2)]
    assert [m for *_, m in pairs] == pytest.approx([2.0, 1.5, 1.0, 1.0, 0.5, 0.5])
    assert counts["near_ties"] == 3  # prompt 1's three pairs (margins 0.05, 0, 0.05)
    capped, _ = make_pairs(combined, groups, mode="all", min_margin=0.4, max_per_prompt=2)
    assert [(w, l) for w, l, _ in capped] == [(1, 0), (1, 2)]


def test_soft_label_is_a_logistic_in_the_margin():
    assert soft_label(0.7, None) == 1.0
    assert soft_label(1.0, 0.5) == pytest.approx(1 / (1 + math.exp(-2)))
    assert soft_label(0.0, 2.0) == 0.5


# ------------------------------------------------------------------ end to end on a tiny pipeline

@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def generate_argv(model, prompts, out, *extra):
    return ["data", "generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
            "--per-prompt", "3", "--steps", "2", "--height", "32", "--width", "32", "--batch-size", "9",
            "--guidance", "1", *extra]


@pytest.fixture(scope="module")
def generated(tiny_sd_path, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "pairs"
    spec = f"{HERE}:brightness"
    assert main(generate_argv(tiny_sd_path, prompts_file, out, "--scorer", f"toy-judge,{spec}:2",
                              "--pairs", "all", "--min-margin", "0", "--soft-labels", "0.5")) == 0
    return out


def test_generated_pairs_are_labelled_as_their_scores_say(generated):
    import pyarrow.parquet as pq

    from ncppo.evaluate.sample import read_jsonl

    rows = pq.read_table(generated / SHARD_NAME).to_pylist()
    manifest = json.loads((generated / "manifest.json").read_text())
    spec = f"{HERE}:brightness"
    assert manifest["counts"]["candidates"] == 9 and manifest["seeds"] == [0, 1, 2]
    assert [s["name"] for s in manifest["scorers"]] == ["toy-judge", spec] and manifest["scorers"][1]["weight"] == 2
    scores = {(r["prompt_index"], r["seed"]): r for r in read_jsonl(generated / "candidates" / "scores.jsonl")}
    assert len(rows) == manifest["counts"]["pairs"] > 0
    raw = {n: np.array([scores[(i, s)][n] for i in range(3) for s in range(3)]) for n in ("toy-judge", spec)}
    combined = combine_scores(raw, {"toy-judge": 1.0, spec: 2.0}, np.repeat(np.arange(3), 3), "zscore")
    for row in rows:
        w, lose = 3 * row["prompt_index"] + row["seed_0"], 3 * row["prompt_index"] + row["seed_1"]
        assert row["caption"] == PROMPTS[row["prompt_index"]]
        assert row["margin"] == pytest.approx(combined[w] - combined[lose]) and row["margin"] >= 0
        assert row["label_0"] == pytest.approx(1 / (1 + math.exp(-row["margin"] / 0.5)))
        assert row["label_1"] == pytest.approx(1 - row["label_0"])
        assert json.loads(row["scores_0"])[spec] == pytest.approx(scores[(row["prompt_index"], row["seed_0"])][spec])
        image = (generated / "candidates" / "images" / f"{row['prompt_index']:05d}_{row['seed_0']}.png").read_bytes()
        assert row["jpg_0"] == image  # the candidate's own PNG, not a re-encoding


def test_the_pair_readers_take_the_dataset_as_it_is(generated, tmp_path):
    from ncppo.data.pairs import open_pairs

    table = open_pairs(generated)
    labels = table.labels()
    assert len(labels) == json.loads((generated / "manifest.json").read_text())["counts"]["pairs"]
    assert ((labels > 0.5) & (labels <= 1)).all()
    assert main(["data", "check", str(generated)]) == 0


def test_a_rerun_makes_nothing_again_and_other_settings_are_refused(tiny_sd_path, prompts_file, generated, capsys):
    spec = f"{HERE}:brightness"
    before = (generated / SHARD_NAME).read_bytes()
    assert main(generate_argv(tiny_sd_path, prompts_file, generated, "--scorer", f"toy-judge,{spec}:2",
                              "--pairs", "all", "--min-margin", "0", "--soft-labels", "0.5")) == 0
    sample = json.loads((generated / "candidates" / "sample_manifest.json").read_text())
    assert sample["generated"] == 0
    assert (generated / SHARD_NAME).read_bytes() == before
    fails(capsys, generate_argv(tiny_sd_path, prompts_file, generated, "--scorer", "toy-judge", "--steps", "3"),
          "other settings", "steps")


def test_nan_scores_skip_that_images_pairs_and_are_named(tiny_sd_path, prompts_file, tmp_path):
    out = tmp_path / "nan"
    assert main(generate_argv(tiny_sd_path, prompts_file, out, "--scorer", f"{HERE}:nan_on_second",
                              "--pairs", "all", "--min-margin", "0")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    # Scored in one batch of 9: candidates 1, 3, 5, 7 get NaN.
    assert manifest["unscored"]["count"] == 4
    assert [(u["prompt_index"], u["seed"]) for u in manifest["unscored"]["images"]] == [(0, 1), (1, 0), (1, 2), (2, 1)]
    import pyarrow.parquet as pq

    rows = pq.read_table(out / SHARD_NAME).to_pylist()
    used = {(r["prompt_index"], r["seed_0"]) for r in rows} | {(r["prompt_index"], r["seed_1"]) for r in rows}
    assert not used & {(0, 1), (1, 0), (1, 2), (2, 1)}
    assert len(rows) == 1 + 0 + 1  # prompt 0: seeds 0, 2; prompt 1: seed 1 alone; prompt 2: seeds 0, 2


def test_a_full_disk_loses_nothing_and_the_rerun_continues(tiny_sd_path, prompts_file, tmp_path, capsys, monkeypatch):
    from PIL import Image

    whole = tmp_path / "whole"
    # One image per pipeline call, so the resumed run batches its images as the whole one did.
    assert main(generate_argv(tiny_sd_path, prompts_file, whole, "--scorer", "toy-judge", "--batch-size", "1")) == 0

    real_save, saved = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        if len(saved) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    cut = tmp_path / "cut"
    monkeypatch.setattr(Image.Image, "save", save)
    line = fails(capsys, generate_argv(tiny_sd_path, prompts_file, cut, "--scorer", "toy-judge", "--batch-size", "1"),
                 "disk is full", "rerun the same command")
    assert "No space" in line
    assert len(list((cut / "candidates" / "images").glob("*.png"))) == 5
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert main(generate_argv(tiny_sd_path, prompts_file, cut, "--scorer", "toy-judge", "--batch-size", "1")) == 0
    assert json.loads((cut / "candidates" / "sample_manifest.json").read_text())["generated"] == 4
    assert (cut / SHARD_NAME).read_bytes() == (whole / SHARD_NAME).read_bytes()


# ------------------------------------------------------------------ bad input, one line each

def test_bad_inputs_are_one_line(tiny_sd_path, prompts_file, tmp_path, capsys):
    out = tmp_path / "bad"
    judge = ("--scorer", "toy-judge")
    fails(capsys, generate_argv(tiny_sd_path, prompts_file, out, "--per-prompt", "1", *judge), "--per-prompt", ">= 2")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    fails(capsys, generate_argv(tiny_sd_path, empty, out, *judge), "empty.txt", "no prompts")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    fails(capsys, generate_argv(tiny_sd_path, binary, out, *judge), "binary.txt", "UTF-8")
    fails(capsys, generate_argv(tiny_sd_path, prompts_file, out, "--scorer", "toy-judge,nosuchmodule:fn"),
          "nosuchmodule")
    fails(capsys, generate_argv(tiny_sd_path, prompts_file, out, "--scorer", "pickscore",
                                "--scorer-path", str(tmp_path / "no-weights")), "pickscore", "no-weights")
    fails(capsys, generate_argv(tiny_sd_path, prompts_file, out, "--scorer", "pickscore"),  # offline: HF_HUB_OFFLINE
          "pickscore", "to get them", "huggingface-cli download yuvalkirstain/PickScore_v1", "--scorer-path")
    assert not (out / SHARD_NAME).exists()


def test_score_takes_a_users_callable_too(generated):
    from ncppo.evaluate.sample import read_index, read_jsonl
    from ncppo.evaluate.score import load_images

    folder = generated / "candidates"
    spec = f"{HERE}:brightness"
    assert main(["score", str(folder), "--scorer", spec]) == 0
    rows = read_jsonl(folder / "scores.jsonl")
    expected = brightness(load_images(folder, read_index(folder)), [r["prompt"] for r in rows])
    assert [r[spec] for r in rows] == pytest.approx(expected)
    assert len(set(expected)) > 1
