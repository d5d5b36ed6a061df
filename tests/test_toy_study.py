"""`ncppo toy study` with a stand-in runner (no training): grid widening and refinement, resume,
the pooled statistics by hand, report and figures. The real runs are the study itself."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest

from ncppo.toy.study import StudyConfig, Study, run_study
from ncppo.toy.study_report import common_beta, head_to_head, steps_to_reach


class FakeRunner:
    """Scores peak at a per-space normalised beta (latent 0.03, NCP 30); NCP a bit better."""

    peaks = {"latent": 0.03, "ncp": 30.0}

    def __init__(self):
        self.calls, self.labels = [], []

    def base_scores(self, prompts, seeds, label=""):
        return [5.0 + 0.01 * (s % 7) for s in seeds]

    def __call__(self, key, spec, prompts, seeds, label=""):
        self.calls.append(key)
        self.labels.append(label)
        height = 1.0 if spec.space == "latent" else 1.2
        level = 5.0 + height - 0.2 * (math.log10(spec.beta) - math.log10(self.peaks[spec.space])) ** 2
        rng = np.random.default_rng(zlib.crc32(f"{spec.space} {spec.seed} {spec.timestep_mode}".encode()))
        scores = (level + 0.05 * rng.normal(size=len(prompts))).tolist()
        curve = [{"step": step, "scores": [5.0 + (level - 5.0) * step / 4 + 0.01 * k for k in range(6)]}
                 for step in range(0, 5, 2)]
        return dict(scores=scores, curve=curve if spec.eval_every else [], seconds=1.0,
                    beta_normalization={"error_scale": 0.03 if spec.space == "latent" else 3e-6,
                                        "effective_beta": spec.beta / (0.03 if spec.space == "latent" else 3e-6)})


def _cfg(tmp_path, **kw):
    values = dict(out=str(tmp_path / "study"), latent_grid=[1.0, 10.0], ncp_grid=[1.0, 10.0], widen=2, refine=True,
                  val_seeds=2, seeds=3, eval_seeds=2, curve_seeds=1, eval_every=2, steps=4, variants=["uniform/down"],
                  variant_seeds=1, objectives=["cpo"], objective_factors=[0.1, 1.0, 10.0], bootstrap=300)
    values.update(kw)
    return StudyConfig(**values)


def test_grids_widen_past_an_edge_then_refine_and_resume(tmp_path):
    runner = FakeRunner()
    study = Study(_cfg(tmp_path, phases=["grid"]), runner)
    study.run_phases()
    chosen = study.store.data["chosen"]
    grid = lambda space: sorted(r["spec"]["beta"] for r in study.store.runs.values() if r["spec"]["space"] == space)
    # latent peaks at 0.03: best 1 is the low edge -> 0.1 -> 0.01 (two decades, the limit; 0.01 is still
    # the best), then refined inside the range: 0.03
    assert grid("latent") == [0.01, 0.03, 0.1, 1.0, 10.0] and chosen["latent"] == 0.03
    # NCP peaks at 30: 10 is the high edge -> 100; then refined with 3 and 30
    assert grid("ncp") == [1.0, 3.0, 10.0, 30.0, 100.0] and chosen["ncp"] == 30.0
    n = len(runner.calls)
    # progress labels: this invocation's k-th run of about 8 planned (2 + 2 refined per grid); the grids
    # grew by one value each, so the count catches up with k at the end
    assert runner.labels[0] == "[1/~8] grid latent-DPO beta 1 seed 0"
    assert [label.split("]")[0] for label in runner.labels] == [f"[{k}/~{max(8, k)}" for k in range(1, n + 1)]
    assert runner.labels[-1].startswith(f"[{n}/~{n}] grid NCP-DPO beta ")
    run_study(_cfg(tmp_path, phases=["grid"]), runner)  # everything is in results.json: nothing reruns
    assert len(runner.calls) == n
    assert (tmp_path / "study" / "manifest.json").is_file()


def test_extra_grid_seeds_for_the_best_values(tmp_path):
    runner = FakeRunner()
    data = run_study(_cfg(tmp_path, phases=["grid", "report"], latent_grid=[0.01, 0.1, 1.0], ncp_grid=[10.0, 100.0],
                          widen=0, refine=False, grid_seeds=2, grid_top=2), runner)
    seeds = {(r["spec"]["space"], r["spec"]["beta"]): r["spec"]["seed"] for r in data["runs"].values()
             if r["spec"]["seed"] == 10}
    assert sorted(seeds) == [("latent", 0.01), ("latent", 0.1), ("ncp", 10.0), ("ncp", 100.0)]
    rows = {r["beta"]: r for r in data["summary"]["grids"]["latent"]}
    assert rows[0.1]["seeds"] == [0, 10] and rows[1.0]["seeds"] == [0] and rows[1.0]["diff_seeds"] == [0]
    assert rows[0.01]["diff_seeds"] == [0, 10]  # paired on both training seeds


def test_all_phases_statistics_and_report(tmp_path):
    runner = FakeRunner()
    data = run_study(_cfg(tmp_path), runner)
    s = data["summary"]
    # labels name the phase and method: planned 8 grid + 6 final + 6 CPO + 1 variant = 21, 23 ran
    assert {label.split("] ")[1].split(" beta")[0] for label in runner.labels} == {
        "grid latent-DPO", "grid NCP-DPO", "final latent-DPO", "final NCP-DPO", "objectives latent-CPO",
        "objectives NCP-CPO", "variants NCP-DPO uniform/down"}
    assert runner.labels[-1] == "[23/~23] variants NCP-DPO uniform/down beta 30 seed 1"
    assert s["chosen"] == {"latent": 0.03, "ncp": 30.0} and s["interior"] == {"latent": True, "ncp": True}
    # the peaks are 3 decades apart: no single value is near the best of both
    assert s["common_beta"] in (0.1, 1.0, 10.0) and not all(s["common_near_best"].values())
    final = [r for r in data["runs"].values() if r["phase"] == "final"]
    assert sorted((r["spec"]["space"], r["spec"]["seed"]) for r in final) == [
        ("latent", 1), ("latent", 2), ("latent", 3), ("ncp", 1), ("ncp", 2), ("ncp", 3)]
    # head to head by hand: NCP's image beats latent's on the same (seed, prompt, image seed)
    by = {(r["spec"]["space"], r["spec"]["seed"]): np.array(r["scores"]) for r in final}
    wins = np.concatenate([(by["ncp", k] > by["latent", k]) + 0.5 * (by["ncp", k] == by["latent", k]) for k in (1, 2, 3)])
    h = s["final"]["ncp_vs_latent"]
    assert h["win_rate"] == pytest.approx(wins.mean()) and h["images"] == 3 * 12 and h["ci"][0] <= h["win_rate"] <= h["ci"][1]
    assert [c["step"] for c in s["final"]["curves"]["ncp"]] == [0, 2, 4]
    assert all(c["low"] <= c["mean"] <= c["high"] for c in s["final"]["curves"]["latent"])
    # CPO ran at the common value x 0.1, 1, 10 in both spaces
    cpo = sorted((r["spec"]["space"], r["spec"]["beta"]) for r in data["runs"].values() if r["spec"]["objective"] == "cpo")
    c = s["common_beta"]
    assert cpo == sorted((sp, float(f"{c * f:.3g}")) for sp in ("latent", "ncp") for f in (0.1, 1.0, 10.0))
    assert set(s["variants"]) == {"t-1/down", "uniform/down"} and s["variants"]["uniform/down"]["vs_t1_down"]
    report = (tmp_path / "study" / "report.md").read_text()
    assert "NCP-DPO vs latent-DPO, head to head" in report and "| cpo |" in report and "uniform/down" in report
    for name in ("curves.png", "grid.png", "results.json"):
        assert (tmp_path / "study" / name).is_file()
    assert json.loads((tmp_path / "study" / "results.json").read_text())["summary"]["chosen"]["ncp"] == 30.0
    shipped = json.loads((tmp_path / "study" / "study_summary.json").read_text())  # what the demo ships
    assert shipped["chosen"] == shipped["final_beta"] == {"latent": 0.03, "ncp": 30.0}
    assert shipped["ncp_vs_latent"]["win_rate"] == h["win_rate"]
    assert "NCP-DPO vs latent-DPO" in shipped["headline"] and "CPU" in shipped["headline"]


def test_final_numbers_stay_with_the_beta_they_ran_at(tmp_path):
    """More grid seeds may move the choice after the final phase ran: the summary keeps pooling
    the final runs at the beta they used, and a new final phase would add runs at the new one."""
    runner = FakeRunner()
    data = run_study(_cfg(tmp_path, phases=["grid", "final", "report"], variants=[], objectives=[]), runner)
    assert data["final_beta"] == {"latent": 0.03, "ncp": 30.0}
    store = json.loads((tmp_path / "study" / "results.json").read_text())
    store["chosen"]["latent"] = 0.1  # as if extra seeds had moved it
    (tmp_path / "study" / "results.json").write_text(json.dumps(store))
    data = run_study(_cfg(tmp_path, phases=["report"], variants=[], objectives=[]), runner)
    assert data["summary"]["final"]["spaces"]["latent"]["beta"] == 0.03 and data["summary"]["final_beta"]["latent"] == 0.03


def test_later_phases_need_the_grid(tmp_path):
    with pytest.raises(RuntimeError, match="grid"):
        run_study(_cfg(tmp_path, phases=["final"]), FakeRunner())
    with pytest.raises(ValueError, match="variants"):
        _cfg(tmp_path, variants=["t-2/down"]).validate()


def _run(seed, curve):
    return {"spec": {"seed": seed}, "curve": [{"step": 25 * i, "scores": [v]} for i, v in enumerate(curve)],
            "scores": curve}


def test_steps_to_reach_and_common_beta_by_hand():
    a = [_run(1, [5.0, 5.5, 6.0, 6.5]), _run(2, [5.0, 5.4, 6.2, 6.4])]
    b = [_run(1, [5.0, 5.2, 5.6, 6.0]), _run(2, [5.0, 5.1, 5.7, 6.2])]
    r = steps_to_reach(a, b, n_resamples=200)
    assert r["target"] == pytest.approx(6.1) and r["steps"] == 50 and r["never_share"] == 0.0  # a: 5.45, 6.1
    never = steps_to_reach(b, a, n_resamples=200)
    assert never["steps"] is None and never["ci"][1] is None and never["never_share"] > 0.5
    tables = {"x": [{"beta": 1.0, "diff": -0.3}, {"beta": 10.0, "diff": 0.0}],
              "y": [{"beta": 1.0, "diff": 0.0}, {"beta": 10.0, "diff": -0.1}]}
    assert common_beta(tables) == 10.0  # worst shortfall 0.1 beats 0.3
    base = {"prompts": ["p"], "scores": [0.0]}
    h = head_to_head([_run(1, [2.0])], [_run(1, [1.0]), _run(2, [3.0])], base, n_resamples=100)
    assert h["win_rate"] == 1.0 and h["seeds"] == 1
