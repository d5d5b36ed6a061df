"""`ncppo compare`: means, win rate with its paired bootstrap interval, refusals, grids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ncppo.cli import main
from ncppo.evaluate.compare import CompareConfig, MismatchError, compare_folders
from ncppo.evaluate.stats import paired_bootstrap_ci


def make_scored(folder, prompts, seeds, scores: dict[str, list[float]], colour=(200, 30, 30)):
    """A sample folder (index.jsonl, PNGs) with given scores.jsonl columns, rows prompt-major."""
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    index, rows = [], []
    for k, (i, s) in enumerate((i, s) for i in range(len(prompts)) for s in seeds):
        file = f"images/{i:05d}_{s}.png"
        Image.new("RGB", (16, 16), colour).save(folder / file)
        base = dict(prompt=prompts[i], prompt_index=i, seed=s, file=file)
        index.append(dict(base, model="m", settings={}))
        rows.append(dict(base, **{m: v[k] for m, v in scores.items()}))
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


PROMPTS = ["a cat", "a dog", "a tree"]
A = {"pickscore": [21.0, 20.0, 19.5, 22.0, 18.0, 20.0], "hpsv2": [0.25, 0.26, 0.27, 0.28, 0.20, 0.30]}
B = {"pickscore": [20.0, 20.0, 20.0, 21.0, 19.0, 19.0], "hpsv2": [0.30, 0.26, 0.20, 0.20, 0.20, 0.10]}


def test_compare_numbers_and_outputs(tmp_path, monkeypatch, capsys):
    a = make_scored(tmp_path / "A", PROMPTS, [0, 1], A)
    b = make_scored(tmp_path / "B", PROMPTS, [0, 1], B, colour=(30, 30, 200))
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(a), str(b), "--grid", "grid.png", "--n-resamples", "2000"]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    ps, hps = result["metrics"]["pickscore"], result["metrics"]["hpsv2"]
    # pickscore pairs: win, tie, loss, win, loss, win -> 3.5 / 6; hpsv2: loss, tie, win, win, tie, win -> 4 / 6
    assert ps["win_rate"] == pytest.approx(3.5 / 6) and (ps["wins"], ps["ties"], ps["losses"]) == (3, 1, 2)
    assert hps["win_rate"] == pytest.approx(4 / 6) and (hps["wins"], hps["ties"], hps["losses"]) == (3, 2, 1)
    assert ps["mean_a"] == pytest.approx(np.mean(A["pickscore"])) and ps["mean_b"] == pytest.approx(20.0 - 1 / 6)
    # two seeds per prompt: the interval resamples the 3 prompts, then the seeds inside them
    assert result["resampled"] == "prompts, then seeds" and result["n_prompts"] == 3 and result["n_images"] == 6
    expected = paired_bootstrap_ci(A["pickscore"], B["pickscore"], n_resamples=2000, groups=[0, 0, 1, 1, 2, 2])
    assert ps["win_rate_ci"] == pytest.approx(list(expected))
    assert ps["win_rate_ci"][0] <= ps["win_rate"] <= ps["win_rate_ci"][1]
    printed = capsys.readouterr().out
    assert "| pickscore | 20.08 | 19.83 | 58.3% |" in printed
    assert (tmp_path / "compare.md").read_text().strip() in printed
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:  # 3 prompts, A left (red), B right (blue)
        arr = np.asarray(grid.convert("RGB"))
    assert grid.width == 2 * 256 + 4 and grid.height > 3 * 256
    assert tuple(arr[100, 100]) == (200, 30, 30) and tuple(arr[100, 256 + 4 + 100]) == (30, 30, 200)


def test_compare_single_metric_html_grid_and_out(tmp_path):
    a = make_scored(tmp_path / "A", PROMPTS, [0, 1], A)
    b = make_scored(tmp_path / "B", PROMPTS, [0, 1], B)
    assert main(["compare", str(a), str(b), "--metric", "hpsv2", "--out", str(tmp_path / "res"),
                 "--grid", str(tmp_path / "res" / "grid.html"), "--grid-prompts", "2"]) == 0
    result = json.loads((tmp_path / "res" / "compare.json").read_text())
    assert list(result["metrics"]) == ["hpsv2"]
    page = (tmp_path / "res" / "grid.html").read_text()
    assert page.count("<tr><td>") == 2 and "../A/images/00000_0.png" in page


def test_compare_refuses_mismatched_seeds_and_prompts(tmp_path, capsys):
    a = make_scored(tmp_path / "A", PROMPTS, [0, 1], A)
    b = make_scored(tmp_path / "B", PROMPTS, [0, 2], B)
    with pytest.raises(MismatchError, match=r"prompt 0 seed 1 \('a cat'\) is in .*A but not in .*B"):
        compare_folders(CompareConfig(dir_a=str(a), dir_b=str(b)))
    from test_cli_errors import fails

    line = fails(capsys, ["compare", str(a), str(b)], "do not hold the same prompts and seeds: prompt 0 seed 1")
    assert line not in capsys.readouterr().out
    c = make_scored(tmp_path / "C", ["a cat", "a bird", "a tree"], [0, 1], B)
    with pytest.raises(MismatchError, match=r"prompt 1 seed 0 differs: 'a dog' in .*A, 'a bird' in .*C"):
        compare_folders(CompareConfig(dir_a=str(a), dir_b=str(c)))


def test_compare_needs_scores_and_a_shared_metric(tmp_path):
    a = make_scored(tmp_path / "A", PROMPTS, [0], {"pickscore": [1.0, 2.0, 3.0]})
    b = make_scored(tmp_path / "B", PROMPTS, [0], {"hpsv2": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="share no score column"):
        compare_folders(CompareConfig(dir_a=str(a), dir_b=str(b)))
    with pytest.raises(ValueError, match="no scores for metric 'pickscore'"):
        compare_folders(CompareConfig(dir_a=str(a), dir_b=str(b), metric=["pickscore"]))
    (b / "scores.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="run `ncppo score"):
        compare_folders(CompareConfig(dir_a=str(a), dir_b=str(b)))


def test_compare_and_score_expected_failures_are_one_line(tmp_path, capsys):
    from test_cli_errors import fails

    a = make_scored(tmp_path / "A", PROMPTS, [0], {"pickscore": [1.0, 2.0, 3.0]})
    b = make_scored(tmp_path / "B", PROMPTS, [0], {"hpsv2": [1.0, 2.0, 3.0]})
    out = ["--out", str(tmp_path / "res")]
    fails(capsys, ["compare", str(a), str(tmp_path / "nope"), *out], f"{tmp_path / 'nope'}: no such folder")
    fails(capsys, ["compare", str(a), str(b), *out], "share no score column")
    fails(capsys, ["compare", str(a), str(b), "--metric", "pickscore", *out], "no scores for metric 'pickscore'")
    c = make_scored(tmp_path / "C", PROMPTS, [0], {"pickscore": [1.0, float("nan"), 3.0]})
    fails(capsys, ["compare", str(a), str(c), *out], f"{c / 'scores.jsonl'}: non-finite pickscore scores")
    d = make_scored(tmp_path / "D", PROMPTS, [0], {"pickscore": [1.0, 2.0, 3.0]})
    lines = (d / "scores.jsonl").read_text().splitlines()
    (d / "scores.jsonl").write_text("\n".join(lines + [lines[0]]) + "\n")
    fails(capsys, ["compare", str(a), str(d), *out], "prompt 0 seed 0 appears twice")
    (d / "scores.jsonl").write_text('{"prompt": "a cat"}\n')
    fails(capsys, ["compare", str(a), str(d), *out], f"{d / 'scores.jsonl'}, row 1: no usable prompt")
    e = make_scored(tmp_path / "E", PROMPTS, [0], {"pickscore": [1.0, 2.0, 3.0]})
    (e / "images" / "00001_0.png").write_bytes(b"not a png")
    fails(capsys, ["compare", str(a), str(e), *out, "--grid", str(tmp_path / "g.png")],
          f"{e / 'images' / '00001_0.png'} (index row prompt 1, seed 0): cannot read image")
    (b / "scores.jsonl").unlink()
    fails(capsys, ["compare", str(a), str(b), *out], "run `ncppo score")
    # score: an unreadable image and an empty index name the file
    fails(capsys, ["score", str(e), "--scorer", "pickscore"], f"{e / 'images' / '00001_0.png'}",
          "cannot read image")
    (e / "index.jsonl").write_text("")
    fails(capsys, ["score", str(e)], f"{e / 'index.jsonl'}: empty index")
