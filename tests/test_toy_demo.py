"""The demo's pieces by hand, and `ncppo demo --quick` end to end (slow)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from ncppo.toy import world
from ncppo.evaluate.stats import paired_bootstrap_ci
from ncppo.toy.demo import STAGES, DemoConfig, compare, curve_points, stage, steps_to_reach
from ncppo.toy.figures import beta_scan, sample_grid, score_curves
from ncppo.toy.report import headline_table

TOY_DOC = Path(__file__).resolve().parents[1] / "docs" / "toy.md"


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



def test_toy_plots_name_the_methods_and_label_the_axes(tmp_path):
    from PIL import Image

    fig = score_curves(tmp_path / "curve.png", {"latent": [(0, 5.0, 4.8, 5.2), (10, 6.0, 5.7, 6.3)],
                                                "ncp": [(0, 5.0, 4.8, 5.2), (10, 6.5, 6.1, 6.9)]}, 6.0, title="t")
    (ax,) = fig.axes
    assert Image.open(tmp_path / "curve.png").size == (700, 420)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training step", "mean toy-judge score")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["latent-DPO", "NCP-DPO", "latent-DPO final score"]
    px = np.asarray(Image.open(tmp_path / "curve.png").convert("RGB")).astype(int)
    assert (np.abs(px - (30, 90, 200)).max(axis=2) < 8).sum() > 50  # the NCP line in the toy's blue
    fig = beta_scan(tmp_path / "scan.png", {"ncp": [(0.1, 5.0, 4.9, 5.1), (1.0, 5.5, 5.4, 5.6), (10.0, 5.2, 5.0, 5.4)]})
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_xlabel().startswith("normalised beta")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["NCP-DPO"]


def test_demo_stage_labels():
    assert [stage(name) for name in STAGES] == [
        "[1/6] pairs", "[2/6] latent-DPO train", "[3/6] NCP-DPO train", "[4/6] base eval", "[5/6] latent-DPO eval",
        "[6/6] NCP-DPO eval"]


def _numbers(table: str) -> list[tuple[float, float]]:
    """Every number of a markdown table with the size of its last printed digit (5.686 -> 0.001)."""
    return [(float(x), 10.0 ** -len(x.partition(".")[2])) for x in re.findall(r"-?\d+(?:\.\d+)?", table)]


def _documented(marker: str) -> str:
    """The block of docs/toy.md between <!-- marker:begin --> and <!-- marker:end -->."""
    found = re.search(rf"<!-- {marker}:begin -->\n(.*?)\n<!-- {marker}:end -->", TOY_DOC.read_text(), re.S)
    assert found, f"docs/toy.md has no {marker} block"
    return found.group(1).strip()


def test_documented_quick_demo_table_has_the_reports_layout():
    """The block the slow test checks is there and shaped like `headline_table` (the numbers are its job)."""
    fake = {"base": {"mean_score": 5.0}, "ncp_vs_latent": {"win_rate": 0.5, "ci95": [0.25, 0.75]},
            **{k: {"mean_score": 5.5, "win_rate_vs_base": 0.5, "win_rate_vs_base_ci95": [0.25, 0.75]}
               for k in ("latent", "ncp")}}
    assert re.sub(r"[\d.]+", "#", _documented("quick-demo")) == re.sub(r"[\d.]+", "#", headline_table(fake))
    assert _numbers("| 5.686 | 41.7% [0.0%, 83.5%] |") == [(5.686, 0.001), (41.7, 0.1), (0.0, 0.1), (83.5, 0.1)]


def test_documented_default_demo_is_the_stored_run(tmp_path):
    """docs/toy.md's default-demo table is docs/toy/results.json's (the run its figures come from),
    and the curve figure redraws from that file."""
    from ncppo.toy.demo import curve_figure

    results = json.loads((TOY_DOC.parent / "toy" / "results.json").read_text())
    assert _documented("default-demo") == headline_table(results)
    assert results["steps"] == 200 and results["eval"]["images"] == 96 and results["settings"]["ncp"]["beta"] == 3.0
    fig = curve_figure(tmp_path / "curve.png", results)
    assert fig.axes[0].get_ylabel() == "mean toy-judge score (24 images a point)"
    assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()[:2]] == [9, 9]  # steps 0, 25, ..., 200


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capfd):
    import torch

    from ncppo.cli import main

    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as documented: other thread counts sum in another order (NCP score ~1e-5 off)
    try:
        assert main(["demo", "--quick", "--out", str(out)]) == 0  # exactly `ncppo demo --quick`, as documented
    finally:
        torch.set_num_threads(threads)
    err = capfd.readouterr().err
    for name in STAGES:  # every progress bar names its stage, method and the stage count
        assert f"{stage(name)}:" in err, (name, err[-2000:])
    results = json.loads((out / "results.json").read_text())
    # docs/toy.md's quick-demo table is this run's, at the printed precision (the demo is deterministic:
    # if a change moves these numbers, rerun `ncppo demo --quick` and paste its table there)
    table, documented = headline_table(results), _documented("quick-demo")
    stale = f"docs/toy.md's quick-demo table is stale; this run gives:\n{table}"
    assert re.sub(r"[\d.]+", "#", documented) == re.sub(r"[\d.]+", "#", table), stale  # same rows and layout
    # at the printed precision, one unit of slack for a rounding boundary (another CPU's last bits)
    for (doc, unit), (run, _) in zip(_numbers(documented), _numbers(table)):
        assert abs(doc - run) <= unit * 1.001, stale
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
