"""ncppo sbs results: majority votes, win rates, two-stage bootstrap and agreement against hand-computed values."""

from __future__ import annotations

import json

import pytest

from ncppo.errors import InputError
from ncppo.sbs.agreement import krippendorff_alpha, pairwise_agreement
from ncppo.evaluate.stats import win_rate_interval
from ncppo.sbs.results import ResultsConfig, majority, summarize

# (prompt_index, seed) -> winners of ann, bob, cat (None = no vote)
HAND_MADE = {(0, 0): ("a", "a", "b"), (0, 1): ("a", "tie", "tie"), (1, 0): ("b", "b", "b"),
             (1, 1): ("a", "b", "tie"), (2, 0): ("a", "a", None)}


def write_votes(path, table=HAND_MADE, question="general", a="/x/model-a", b="/x/model-b"):
    rows = []
    for (pi, seed), winners in table.items():
        for name, w in zip(("ann", "bob", "cat"), winners):
            if w is not None:
                rows.append(dict(prompt=f"prompt {pi}", prompt_index=pi, seed=seed, question=question, winner=w,
                                 left="a", annotator=name, time="t", a=a, b=b))
    with open(path, "a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_majority():
    assert majority(["a", "a", "b"]) == "a" and majority(["b"]) == "b" and majority(["tie", "tie", "a"]) == "tie"
    assert majority(["a", "b", "tie"]) == "tie" and majority(["a", "b"]) == "tie"


def test_krippendorff_alpha_textbook_example():
    # Krippendorff (2011), nominal data with missing values: 4 coders, 12 units, alpha = 0.743
    coders = [[1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
              [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]]
    units = [[v for v in unit if v is not None] for unit in zip(*coders)]
    assert krippendorff_alpha(units) == pytest.approx(0.7434, abs=5e-5)


def test_agreement_on_a_hand_made_case():
    units = [[w for w in ws if w] for ws in HAND_MADE.values()]
    # coincidences: o_aa 3, o_bb 3, o_tt 1, o_ab 1.5, o_at 1.5, o_bt 0.5 (each both ways); n_a 6, n_b 5, n_t 3, n 14
    assert krippendorff_alpha(units) == pytest.approx(1 - 13 * 7 / (14 ** 2 - 36 - 25 - 9))  # 5/18
    assert pairwise_agreement(units) == pytest.approx(7 / 14)
    assert krippendorff_alpha([["a", "a"], ["b", "b", "b"]]) == 1.0
    assert krippendorff_alpha([["a", "a"], ["a"]]) is None and krippendorff_alpha([["a"], ["b"]]) is None


def test_summarize_hand_made_votes(tmp_path):
    path = write_votes(tmp_path / "v.jsonl")
    write_votes(path, {(0, 0): ("b", None, None)}, question="visual")
    result = summarize(ResultsConfig(votes=[str(path)], n_resamples=2000))
    g = result["questions"]["general"]
    assert g["win_rate"] == pytest.approx(3 / 5)  # majorities a, tie, b, tie, a
    assert (g["a_wins"], g["ties"], g["b_wins"], g["n_items"], g["n_prompts"], g["n_votes"]) == (2, 2, 1, 5, 3, 14)
    assert g["vote_win_rate"] == pytest.approx(7.5 / 14)
    assert g["krippendorff_alpha"] == pytest.approx(5 / 18) and g["pairwise_agreement"] == pytest.approx(0.5)
    assert g["annotators_per_item"] == {"2": 1, "3": 4} and g["votes_per_annotator"] == {"ann": 5, "bob": 5, "cat": 4}
    # the shared interval of `ncppo compare`, over the majority values with prompts as the top stage
    assert g["win_rate_ci"] == list(win_rate_interval([1, .5, 0, .5, 1], [0, 0, 1, 1, 2], n_resamples=2000))
    assert g["win_rate_ci"] != list(win_rate_interval([1, .5, 0, .5, 1], None, n_resamples=2000))
    v = result["questions"]["visual"]
    assert (v["win_rate"], v["n_votes"], v["krippendorff_alpha"]) == (0.0, 1, None)
    assert result["annotators"] == {"ann": {"general": 5, "visual": 1}, "bob": {"general": 5}, "cat": {"general": 4}}
    assert (result["label_a"], result["label_b"]) == ("model-a", "model-b")


def test_cli_results_writes_json_and_markdown(tmp_path, capsys):
    from ncppo.cli import main

    path = write_votes(tmp_path / "v.jsonl")
    assert main(["sbs", "results", str(path), "--out", str(tmp_path / "res"), "--n-resamples", "500"]) == 0
    saved = json.loads((tmp_path / "res" / "sbs.json").read_text())
    assert saved["questions"]["general"]["win_rate"] == pytest.approx(0.6) and saved["config"]["n_resamples"] == 500
    md = (tmp_path / "res" / "sbs.md").read_text()
    assert "| general | 60.0% | [" in md and "| 2 | 2 | 1 | 5 | 3 | 14 | 53.6% | 0.278 | 0.500 |" in md
    assert "| ann | 5 | 5 |" in md and md.strip() in capsys.readouterr().out
    # votes on swapped folders mixed in: "a" would mean two models, so it is refused
    write_votes(path, {(3, 0): ("a", None, None)}, a="/x/model-b", b="/x/model-a")
    assert main(["sbs", "results", str(path), "--out", str(tmp_path / "res")]) == 2
    assert "compare different folders" in capsys.readouterr().err


def test_reversed_sessions_on_folders_with_one_name_are_refused(tmp_path, capsys):
    # `serve runs/ncp/samples runs/base/samples` and `serve runs/base/samples runs/ncp/samples`: both
    # folders are called "samples", but "a" means ncp in one file and base in the other
    first = write_votes(tmp_path / "v1.jsonl", a="/r/ncp/samples", b="/r/base/samples")
    second = write_votes(tmp_path / "v2.jsonl", {(5, 0): ("b", "b", None)}, a="/r/base/samples", b="/r/ncp/samples")
    with pytest.raises(InputError, match="compare different folders: /r/ncp/samples vs /r/base/samples "
                                         r"\(14 votes\), /r/base/samples vs /r/ncp/samples \(2 votes\); "
                                         "sessions served A and B in reverse order"):
        summarize(ResultsConfig(votes=[str(first), str(second)], n_resamples=10))
    from ncppo.cli import main

    assert main(["sbs", "results", str(first), str(second), "--out", str(tmp_path / "res")]) == 2
    assert capsys.readouterr().err.startswith("ncppo sbs results: error: the votes compare different folders")
    # one comparison: the default labels are the shortest path ends that tell the folders apart
    result = summarize(ResultsConfig(votes=[str(first)], n_resamples=10))
    assert (result["label_a"], result["label_b"]) == ("ncp/samples", "base/samples")


@pytest.mark.parametrize("command", ["results", "export"])
def test_cli_on_a_file_that_is_not_a_vote_log_is_one_error_line(tmp_path, capsys, command):
    import warnings

    from ncppo.cli import main

    readme = tmp_path / "README.md"
    readme.write_text("# My votes\n\nSee votes.jsonl.\n")
    image = tmp_path / "image.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    out = tmp_path / "res"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning (with its source path) would fail the test
        assert main(["sbs", command, str(readme), "--out", str(out)]) == 2
        assert capsys.readouterr().err == (
            f"ncppo sbs {command}: error: {readme} is not a vote log of `ncppo sbs serve`: none of its 2 "
            "non-empty line(s) is a vote (line 1: not valid JSON (Expecting value))\n")
        assert main(["sbs", command, str(image), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"ncppo sbs {command}: error: {image} is not a vote log")
        # a vote log with two bad lines (a crash, a hand edit) and a README given with it
        votes = write_votes(tmp_path / "v.jsonl")
        with open(votes, "a") as fh:
            fh.write('{"prompt": "p", "prompt_ind\n{"winner": "left"}\n')
        assert main(["sbs", command, str(votes), str(readme), "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"ncppo sbs {command}: error: {readme} is not a vote log")
        # alone, the log is usable: one clean warning line on stderr, no Python warning, the 14 votes used
        if command == "export":
            return  # export needs the sample folders (test_sbs_export.py); the warning is the same code
        assert main(["sbs", command, str(votes), "--out", str(out), "--n-resamples", "200"]) == 0
    err = capsys.readouterr().err
    assert err == (f"ncppo sbs results: warning: skipped 2 bad vote line(s): {votes}, line 15: not valid JSON "
                   f"(Invalid control character at); {votes}, line 16: missing or empty 'prompt'\n")
    assert json.loads((out / "sbs.json").read_text())["n_votes"] == 14
