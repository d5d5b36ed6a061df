"""ncppo sbs export: votes become Pick-a-Pic-schema pairs that the pair reader, the training dataset
and `ncppo data check` read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ncppo.cli import main
from ncppo.data.dataset import PreferenceDataset
from ncppo.data.pairs import open_pairs
from ncppo.sbs.server import ServeConfig, open_session
from test_sbs_server import make_sample_folders


@pytest.fixture
def voted(tmp_path):
    """Votes cast through the voting session (3 annotators, first 3 items, general; one on visual)."""
    dir_a, dir_b = make_sample_folders(tmp_path, seeds=(0,))
    out = tmp_path / "votes.jsonl"
    session = open_session(ServeConfig(dir_a=str(dir_a), dir_b=str(dir_b), out=str(out)))
    items = session.items
    # item 0: A, A, B -> A; item 1: B, B, tie -> B; item 2: A, B, tie -> tie. Choices are screen sides.
    wanted = {0: "aab", 1: "bbt", 2: "abt"}
    for k, winners in wanted.items():
        for name, w in zip(("ann", "bob", "cat"), winners):
            if w == "t":
                choice = "tie"
            else:
                choice = "left" if session.image(name, items[k].key, "left") == (
                    items[k].file_a if w == "a" else items[k].file_b) else "right"
            session.vote(name, items[k].key, "general", choice)
    session.vote("ann", items[3].key, "visual", "tie")
    session.log.close()
    return out, items


def test_export_parquet_reads_back_with_images_and_labels(tmp_path, voted, capsys):
    out, items = voted
    assert main(["sbs", "export", str(out), "--out", str(tmp_path / "pairs")]) == 0
    table = open_pairs(tmp_path / "pairs")
    assert len(table) == 3 and table.image_columns == ("jpg_0", "jpg_1")
    assert table.labels().tolist() == [1.0, 0.0, 0.5]
    for row, item in enumerate(items[:3]):
        record = table.load(row)
        assert record.caption == item.prompt
        assert np.array_equal(np.asarray(record.image_0), np.asarray(Image.open(item.file_a).convert("RGB")))
        assert np.array_equal(np.asarray(record.image_1), np.asarray(Image.open(item.file_b).convert("RGB")))
    data = PreferenceDataset(table, resolution=32)  # what `ncppo train` builds; ties dropped by default
    assert data.stats["pairs"] == 2 and data.stats["ties"] == 1
    report = tmp_path / "check.json"
    assert main(["data", "check", str(tmp_path / "pairs"), "--json", str(report)]) == 0
    checked = json.loads(report.read_text())
    assert checked["rows"] == 3 and checked["error_rows"] == 0 and set(checked["errors"].values()) == {0}
    assert checked["warnings"]["tie"] == 1 and checked["warnings"]["duplicate_pair"] == 0
    manifest = json.loads((tmp_path / "pairs" / "export_manifest.json").read_text())
    assert (manifest["pairs"], manifest["votes"], manifest["ties"]) == (3, 9, 1)


def test_export_each_vote_as_jsonl_of_paths(tmp_path, voted):
    out, items = voted
    assert main(["sbs", "export", str(out), "--out", str(tmp_path / "p"), "--format", "jsonl",
                 "--aggregate", "votes", "--drop-ties"]) == 0
    table = open_pairs(tmp_path / "p")
    assert table.image_columns == ("image_0", "image_1")
    assert table.labels().tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # 9 votes less 2 ties, in item order
    assert table.load(0).caption == items[0].prompt
    rows = [json.loads(x) for x in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]
    assert rows[0]["image_0"] == str(items[0].file_a) and rows[0]["num_votes"] == 1
    # the visual question has one vote, a tie
    assert main(["sbs", "export", str(out), "--out", str(tmp_path / "v"), "--question", "visual"]) == 0
    assert open_pairs(tmp_path / "v").labels().tolist() == [0.5]


def test_export_refuses_votes_on_samples_it_cannot_find(tmp_path, voted, capsys):
    out, _ = voted
    line = json.loads(out.read_text().splitlines()[0]) | {"prompt_index": 9}
    with open(out, "a") as fh:
        fh.write(json.dumps(line) + "\n")
    assert main(["sbs", "export", str(out), "--out", str(tmp_path / "pairs")]) == 2
    assert "prompt 9 seed 0" in capsys.readouterr().err and not (tmp_path / "pairs" / "pairs.parquet").exists()


def test_export_remaps_votes_of_the_reversed_session(tmp_path, voted, capsys):
    """`serve B A` votes (winner "b" = the first session's A) count for A once the folders are chosen."""
    out, items = voted
    dir_a, dir_b = tmp_path / "model-a", tmp_path / "model-b"
    reversed_log = tmp_path / "votes-reversed.jsonl"
    session = open_session(ServeConfig(dir_a=str(dir_b), dir_b=str(dir_a), out=str(reversed_log)))
    for k in range(3):  # dan prefers model-a every time, recorded as winner "b"
        key = items[k].key
        session.vote("dan", key, "general", "left" if session.image("dan", key, "left") == items[k].file_a else "right")
    session.log.close()
    assert {json.loads(x)["winner"] for x in reversed_log.read_text().splitlines()} == {"b"}
    # per item, votes of ann, bob, cat (A, B order) then dan: item 0 aab+a, item 1 bbt+a, item 2 abt+a
    expected = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0]
    args = ["sbs", "export", str(out), str(reversed_log), "--format", "jsonl", "--aggregate", "votes"]
    assert main(args + ["--out", str(tmp_path / "p1"), "--dir-a", str(dir_a), "--dir-b", str(dir_b)]) == 0
    assert open_pairs(tmp_path / "p1").labels().tolist() == expected
    first = json.loads((tmp_path / "p1" / "pairs.jsonl").read_text().splitlines()[0])
    assert (first["model_0"], first["image_0"]) == ("model-a", str(items[0].file_a))
    # folders chosen the other way round: every label flips
    assert main(args + ["--out", str(tmp_path / "p2"), "--dir-a", str(dir_b), "--dir-b", str(dir_a)]) == 0
    assert open_pairs(tmp_path / "p2").labels().tolist() == [1.0 - x for x in expected]
    # no folders given: the order most votes were cast in (9 votes A B, 3 votes B A)
    assert main(args + ["--out", str(tmp_path / "p3")]) == 0
    assert open_pairs(tmp_path / "p3").labels().tolist() == expected
    # majority per item with dan's vote: item 0 a (3 of 4), item 1 b (2 of 4), item 2 a (2 of 4; a tie without dan)
    assert main(["sbs", "export", str(out), str(reversed_log), "--out", str(tmp_path / "p4"),
                 "--dir-a", str(dir_a), "--dir-b", str(dir_b)]) == 0
    assert open_pairs(tmp_path / "p4").labels().tolist() == [1.0, 0.0, 1.0]
    capsys.readouterr()
    # votes on a pair that is neither order of the chosen folders are refused
    other = tmp_path / "votes-other.jsonl"
    line = json.loads(out.read_text().splitlines()[0]) | {"a": str(tmp_path / "model-c"), "annotator": "eve"}
    other.write_text(json.dumps(line) + "\n")
    assert main(["sbs", "export", str(out), str(other), "--out", str(tmp_path / "p5"),
                 "--dir-a", str(dir_a), "--dir-b", str(dir_b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ncppo sbs export: error: 1 vote(s) were cast on {tmp_path / 'model-c'} vs {dir_b}, "
                          f"which is neither --dir-a {dir_a} --dir-b {dir_b} nor the reverse")
    assert not (tmp_path / "p5").exists()


def test_export_takes_moved_folders_in_the_recorded_order(tmp_path, voted):
    import shutil

    out, _ = voted
    shutil.move(tmp_path / "model-a", tmp_path / "moved-a")
    shutil.move(tmp_path / "model-b", tmp_path / "moved-b")
    assert main(["sbs", "export", str(out), "--out", str(tmp_path / "p"), "--dir-a", str(tmp_path / "moved-a"),
                 "--dir-b", str(tmp_path / "moved-b")]) == 0
    assert open_pairs(tmp_path / "p").labels().tolist() == [1.0, 0.0, 0.5]
