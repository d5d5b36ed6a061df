"""`ncppo toy online --quick`: every arm runs through the real commands (train on fixed pairs,
iterate labelled by the judge or the hackable proxy, with and without the guard), and the report's
numbers are those of results.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ncppo.cli import main


@pytest.mark.slow
def test_quick_online_study(tmp_path):
    out = tmp_path / "online"
    assert main(["toy", "online", "--quick", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert sorted(data["runs"]) == ["hack-guarded-s1", "hack-unguarded-s1", "offline-latent-s1", "offline-ncp-s1",
                                    "online-latent-s1", "online-ncp-s1"]
    summary = json.loads((out / "summary.json").read_text())
    for space in ("latent", "ncp"):
        for arm in ("offline", "online"):
            run = data["runs"][f"{arm}-{space}-s1"]
            assert summary["compare"][space][arm]["mean"] == pytest.approx(np.mean(run["scores"]))
    online = data["runs"]["online-ncp-s1"]
    assert [h["step"] for h in online["curve"]] == [0, 2, 4] and online["rounds_run"] == 2
    offline = data["runs"]["offline-ncp-s1"]
    assert offline["pairs"] == 2 * 24 * 2 // 2 and [h["step"] for h in offline["curve"]] == [0, 2, 4]
    guarded = data["runs"]["hack-guarded-s1"]
    assert guarded["spec"]["drop"] == 0.3 and data["runs"]["hack-unguarded-s1"]["spec"]["drop"] is None
    report = (out / "report.md").read_text()
    h = summary["compare"]["ncp"]["online_vs_offline"]
    assert f"**{100 * h['win_rate']:.1f}%**" in report
    assert (out / "compare.png").stat().st_size > 1000 and (out / "hack.png").stat().st_size > 1000
    # resumable: a second run finds every arm done and writes the same report
    assert main(["toy", "online", "--quick", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == report


def _documented_report(tmp_path, results: str, cfg, marker: str, figures: str) -> dict:
    """Asserts docs/online.md's `marker` block is the report written from `results`; returns its summary."""
    import re
    from pathlib import Path

    from ncppo.toy.online_report import write_online_report

    root = Path(__file__).resolve().parents[1]
    summary = write_online_report(tmp_path, json.loads((root / results).read_text()), cfg)
    report = (tmp_path / "report.md").read_text().strip().splitlines()
    body = "\n".join(report[1:]).strip().replace("\n## ", "\n### ")
    body = body.replace("](compare.png)", f"]({figures}/compare.png)").replace("](hack.png)", f"]({figures}/hack.png)")
    doc = re.search(rf"<!-- {marker}:begin -->\n(.*?)\n<!-- {marker}:end -->", (root / "docs/online.md").read_text(), re.S)
    assert doc and doc.group(1).strip() == body
    return summary


def test_documented_evidence_is_the_stored_study(tmp_path):
    """docs/online.md's evidence blocks are the reports `write_online_report` writes from the stored
    studies (docs/online/results.json; latent-DPO at beta 1 in docs/online/latent-beta-1/), and the
    README's table quotes the same numbers."""
    import re
    from pathlib import Path

    from ncppo.toy.online import OnlineConfig

    summary = _documented_report(tmp_path / "main", "docs/online/results.json", OnlineConfig(seeds=5).resolved(),
                                 "online", "online")
    _documented_report(tmp_path / "beta1", "docs/online/latent-beta-1/results.json",
                       OnlineConfig(seeds=5, latent_beta=1.0, parts=["compare"]).resolved(), "online-latent-beta-1",
                       "online/latent-beta-1")
    root = Path(__file__).resolve().parents[1]
    readme = re.search(r"<!-- online-evidence:begin -->\n(.*?)\n<!-- online-evidence:end -->",
                       (root / "README.md").read_text(), re.S).group(1)
    for space in ("latent", "ncp"):
        for arm in ("offline", "online"):
            p = summary["compare"][space][arm]
            assert f"{p['mean']:.3f} [{p['mean_ci'][0]:.3f}, {p['mean_ci'][1]:.3f}]" in readme
            assert f"{100 * p['win_vs_base']:.1f}%" in readme
    assert f"{100 * summary['hack']['guarded_vs_unguarded']['win_rate']:.1f}%" in readme
