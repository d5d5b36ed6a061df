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
