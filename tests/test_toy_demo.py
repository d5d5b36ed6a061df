"""The demo's pieces by hand, and `ncppo demo --quick` end to end (slow)."""

import json

import numpy as np
import pytest

from ncppo.toy import world
from ncppo.evaluate.stats import paired_bootstrap_ci
from ncppo.toy.demo import DemoConfig, compare, curve_points, steps_to_reach
from ncppo.toy.figures import band_plot, grid_plot, sample_grid


def test_steps_to_reach_and_resolved_defaults():
    hist = [{"step": 0, "mean_score": 7.0}, {"step": 25, "mean_score": 5.0}, {"step": 50, "mean_score": 6.1}]
    assert steps_to_reach(hist, 6.0) == 50  # step 0 never counts
    assert steps_to_reach(hist, 6.2) is None
    q = DemoConfig(quick=True).resolved()
    assert (q["steps"], q["pairs"], q["eval_seeds"], q["curve_seeds"], q["eval_every"]) == (10, 100, 2, 1, 10)
    assert (q["batch_size"], q["sample_steps"]) == (8, 10)
    d = DemoConfig(steps=40).resolved()
    assert (d["steps"], d["eval_every"], d["pairs"]) == (40, 5, 2000)


def test_compare_by_hand():
    scores = {"base": np.array([1.0, 2.0, 3.0, 4.0]), "latent": np.array([2.0, 2.0, 1.0, 5.0]),
              "ncp": np.array([2.0, 3.0, 4.0, 3.0])}
    groups = ["p", "p", "q", "q"]  # two prompts x two seeds: the intervals resample prompts, then seeds
    r = compare(scores, n_resamples=200, seed=0, groups=groups)
    assert r["base"]["mean_score"] == 2.5 and r["latent"]["mean_score"] == 2.5
    assert r["latent"]["win_rate_vs_base"] == (1 + 0.5 + 0 + 1) / 4
    assert r["ncp"]["win_rate_vs_base"] == 3 / 4
    assert r["ncp_vs_latent"]["win_rate"] == (0.5 + 1 + 1 + 0) / 4
    assert r["ncp"]["win_rate_vs_base_ci95"] == list(paired_bootstrap_ci(scores["ncp"], scores["base"],
                                                                         n_resamples=200, groups=groups))
    lo, hi = r["ncp"]["mean_score_ci95"]
    assert lo <= 3.0 <= hi


def test_curve_points_get_bands_from_per_image_scores():
    prompts = ["p", "p", "q", "q"]
    hist = [{"step": 0, "mean_score": 2.5, "scores": [1.0, 2.0, 3.0, 4.0]}, {"step": 5, "mean_score": 3.0}]
    pts = curve_points(hist, prompts, n_resamples=200, seed=0)
    assert pts[0]["ci95"][0] <= 2.5 <= pts[0]["ci95"][1] and "ci95" not in pts[1]


def test_figures_have_the_expected_geometry():
    img = world.render_prompt("a red circle on a white background", 0)
    grid = sample_grid({"a": [img] * 3, "b": [img] * 3}, ["a", "b"], scale=2)
    assert grid.size == (80 + 3 * 66, 2 * 66)
    labelled = sample_grid({"a": [img] * 3}, ["a"], scale=2, columns=["red circle on a white #1000", "x", "y"])
    assert labelled.size[1] > 66  # a band of column labels above the images
    top = np.asarray(labelled)[: labelled.size[1] - 66, 80:80 + 66]
    assert (top < 128).any()  # the first column's label is drawn
    plot = band_plot({"latent": [(0, 5.0, 4.8, 5.2), (10, 6.0, 5.7, 6.3)],
                      "ncp": [(0, 5.0, 4.8, 5.2), (10, 6.5, 6.1, 6.9)]}, 6.0)
    assert plot.size == (560, 360)
    px = np.asarray(plot)
    assert (np.all(px == (30, 90, 200), axis=2)).sum() > 50  # the NCP line is drawn
    shaded = np.all(np.abs(px.astype(int) - (206, 218, 238)) < 12, axis=2)  # NCP blue at alpha 50 on white
    assert shaded.sum() > 200  # and its band
    scan = grid_plot({"latent-DPO": [(0.1, 5.0, 4.9, 5.1), (1.0, 5.5, 5.4, 5.6), (10.0, 5.2, 5.0, 5.4)]})
    assert scan.size == (560, 360)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    from ncppo.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--bootstrap", "500"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 10 and results["eval"]["images"] == 6 * 2
    for key in ("latent", "ncp"):
        assert 0.0 <= results[key]["win_rate_vs_base"] <= 1.0
        lo, hi = results[key]["win_rate_vs_base_ci95"]
        assert lo <= results[key]["win_rate_vs_base"] <= hi
        assert [h["step"] for h in results["curves"][key]] == [0, 10]
    assert results["settings"]["ncp"]["beta"] == DemoConfig().ncp_beta
    assert results["settings"]["ncp"]["beta_normalize"] and results["settings"]["ncp"]["error_scale"] > 0
    assert all("ci95" in p for p in results["curves"]["ncp"])
    for name in ("report.md", "judge_over_steps.png", "samples.png", "manifest.json"):
        assert (out / name).is_file()
    report = (out / "report.md").read_text()
    assert "NCP-DPO" in report and "normalised" in report
