"""Toy pairs: Bradley-Terry labels by hand, a valid Pick-a-Pic-schema shard the training loader reads."""

import json
import math

import numpy as np
import pytest

from ncppo.toy import world
from ncppo.toy.data import DataConfig, bradley_terry_label, build_pairs
from ncppo.toy.judge import judge_score


def test_bradley_terry_label_by_hand():
    p0 = 1 / (1 + math.exp(-2.0))  # s0 - s1 = 1 at temperature 0.5: 0.8808
    assert bradley_terry_label(6.0, 5.0, p0 - 1e-6, 0.5, 0.1) == 1.0
    assert bradley_terry_label(6.0, 5.0, p0 + 1e-6, 0.5, 0.1) == 0.0
    assert bradley_terry_label(5.0, 5.05, 0.0, 0.5, 0.1) == 0.5  # inside the tie margin
    assert bradley_terry_label(5.0, 6.0, 0.99, 0.0, 0.1) == 0.0 and bradley_terry_label(6.0, 5.0, 0.99, 0.0, 0.1) == 1.0


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory):
    return build_pairs(DataConfig(out=str(tmp_path_factory.mktemp("toy-pairs")), pairs=60, seed=3))


def test_shard_is_pick_a_pic_schema_and_deterministic(toy_pairs, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(toy_pairs / "train-00000-of-00001.parquet")
    assert table.num_rows == 60
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid"} <= set(table.column_names)
    rows = table.to_pylist()
    assert all(r["caption"] in world.prompts("train") for r in rows)
    assert all(r["label_0"] in (0.0, 0.5, 1.0) and r["label_0"] + r["label_1"] == 1.0 for r in rows)
    assert len({r["image_0_uid"] for r in rows} | {r["image_1_uid"] for r in rows}) == 120
    for r in rows:
        if abs(r["score_0"] - r["score_1"]) < 0.1:
            assert r["label_0"] == 0.5
    manifest = json.loads((toy_pairs / "manifest.json").read_text())
    assert manifest["config"]["pairs"] == 60 and manifest["stats"]["pairs"] == 60
    again = build_pairs(DataConfig(out=str(tmp_path / "again"), pairs=60, seed=3))
    assert pq.read_table(again / "train-00000-of-00001.parquet").equals(table)


def test_training_reader_and_dataset_read_it_winner_first(toy_pairs):
    import pyarrow.parquet as pq

    from ncppo.data.dataset import PreferenceDataset
    from ncppo.data.pairs import open_pairs

    pairs = open_pairs(toy_pairs)
    assert len(pairs) == 60
    rec = pairs.load(0)
    assert rec.image_0.size == (32, 32) and rec.caption in world.prompts("train")
    # the stored scores are the judge's scores of the decoded images
    stored = pq.read_table(toy_pairs / "train-00000-of-00001.parquet").column("score_0")[0].as_py()
    assert judge_score(rec.image_0, rec.caption) == pytest.approx(stored)
    ds = PreferenceDataset(pairs, 32)
    labels = pairs.labels()
    assert len(ds) == int((labels != 0.5).sum())
    item = ds[0]
    assert tuple(item["pixel_values"].shape) == (2, 3, 32, 32)
    row = item["row"]
    rec = pairs.load(row)
    winner = rec.image_0 if rec.label_0 == 1.0 else rec.image_1
    expected = np.asarray(winner, dtype=np.float32) / 127.5 - 1
    assert np.allclose(item["pixel_values"][0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_labels_mostly_follow_the_judge(toy_pairs):
    manifest = json.loads((toy_pairs / "manifest.json").read_text())
    assert manifest["stats"]["label_agrees_with_judge"] > 0.75
