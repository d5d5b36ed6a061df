"""Readers, orientation, ties, bad rows, transforms and collation (ncppo.data.pairs/dataset)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ncppo.data.dataset import PreferenceDataset, collate_pairs
from ncppo.data.pairs import BadRowError, PairSchemaError, open_pairs, to_rgb
from ncppo.data.transforms import prepare_image

# hand-derived from conftest.PAIR_ROWS: label 1 -> image 0 wins, 0 -> image 1 wins, row 2 is a tie
EXPECTED_ROWS = [0, 1, 3, 4, 5]
EXPECTED_WINNER_SIDE = {0: 0, 1: 1, 3: 0, 4: 1, 5: 0}


def _write_parquet(rows, path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def sources(pairs_parquet, pairs_csv, pair_rows, tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("readers")
    datasets.Dataset.from_list(pair_rows).save_to_disk(str(root / "disk"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(pair_rows)})
    dd.save_to_disk(str(root / "diskdict"))
    # two parquet shards of one split beside a validation shard that must be ignored
    shards = root / "shards"
    (shards / "data").mkdir(parents=True)
    _write_parquet(pair_rows[:4], shards / "data" / "train-00000-of-00002.parquet")
    _write_parquet(pair_rows[4:], shards / "data" / "train-00001-of-00002.parquet")
    _write_parquet(pair_rows[:1], shards / "data" / "validation-00000-of-00001.parquet")
    arrow_file = next((root / "disk").glob("*.arrow"))
    return {
        "parquet folder": dict(source=pairs_parquet),
        "parquet shards with splits": dict(source=shards),
        "save_to_disk": dict(source=root / "disk"),
        "save_to_disk dict": dict(source=root / "diskdict"),
        "arrow file": dict(source=arrow_file),
        "csv + images": dict(source=pairs_csv / "pairs.csv"),
        "jsonl + images": dict(source=pairs_csv / "pairs.jsonl"),
    }


def test_every_reader_yields_the_same_oriented_pairs(sources, pair_rows):
    reference = None
    for name, kwargs in sources.items():
        table = open_pairs(kwargs["source"])
        assert len(table) == 6, name
        ds = PreferenceDataset(table, 16)
        assert ds.stats["ties_dropped"] == 1 and len(ds) == 5, name
        items = [ds[i] for i in range(len(ds))]
        assert [it["row"] for it in items] == EXPECTED_ROWS, name
        for it in items:
            src = pair_rows[it["row"]]
            side = EXPECTED_WINNER_SIDE[it["row"]]
            winner = np.asarray(Image.open(io.BytesIO(src[f"jpg_{side}"])).convert("RGB"))
            # the flat colour of the winner's top-left corner survives resize and crop
            got = ((it["pixel_values"][0, :, 0, 0] + 1) * 127.5).round().numpy()
            assert np.abs(got - winner[0, 0]).max() <= 1, (name, it["row"])
            assert it["caption"] == src["caption"] and it["skipped"] == []
        stacked = torch.stack([it["pixel_values"] for it in items])
        if reference is None:
            reference = stacked
        else:
            assert torch.equal(stacked, reference), name


def test_meta_reads_caption_label_and_uids(pairs_parquet):
    table = open_pairs(pairs_parquet)
    m = table.meta(1)
    assert (m.row, m.caption, m.label_0, m.uid_0, m.uid_1) == (1, "a blue square", 0.0, "img1a", "img1b")
    assert table.labels().tolist() == [1.0, 0.0, 0.5, 1.0, 0.0, 1.0]


def test_keep_ties_keeps_image_0_first_with_label_half(pairs_parquet):
    ds = PreferenceDataset(open_pairs(pairs_parquet), 16, keep_ties=True)
    assert len(ds) == 6 and ds.stats["ties"] == 1 and ds.stats["ties_dropped"] == 0
    assert ds[2]["row"] == 2 and ds[2]["label"] == 0.5


def test_corrupt_row_is_skipped_counted_and_named(pair_rows, tmp_path):
    rows = [dict(r) for r in pair_rows]
    rows[1]["jpg_1"] = b"\x89PNG not really"
    rows[3]["jpg_0"] = b""
    _write_parquet(rows, tmp_path / "bad.parquet")
    table = open_pairs(tmp_path / "bad.parquet")
    with pytest.raises(BadRowError) as err:
        table.load(1)
    assert err.value.row == 1 and "image 1 cannot be decoded" in str(err.value) and "bad.parquet" in str(err.value)
    ds = PreferenceDataset(table, 16)
    item = ds[1]  # row 1 is bad -> replaced by the next good one (row 3 is bad too) -> row 4
    assert item["row"] == 4
    assert [r for r, _ in item["skipped"]] == [1, 3]
    assert "empty" in item["skipped"][1][1]
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert batch["rows"] == [0, 4, 4, 4, 5]
    # index 1 hits rows 1 and 3, index 2 hits row 3 again
    assert sorted(r for r, _ in batch["skipped"]) == [1, 3, 3]


def test_missing_image_file_is_a_bad_row(pairs_csv, tmp_path):
    import shutil

    folder = tmp_path / "csv"
    shutil.copytree(pairs_csv, folder)
    (folder / "images" / "img3a.png").unlink()
    table = open_pairs(folder / "pairs.csv")
    with pytest.raises(BadRowError, match=r"row 3: image 0 file 'img3a' not found"):
        table.load(3)


def test_missing_columns_name_the_file_the_column_and_what_was_found(pair_rows, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "label_0"} for r in pair_rows]
    _write_parquet(rows, tmp_path / "nolabel.parquet")
    with pytest.raises(PairSchemaError, match=r"nolabel\.parquet: missing column 'label_0'.*found columns: caption, jpg_0"):
        open_pairs(tmp_path / "nolabel.parquet")
    (tmp_path / "noimg.csv").write_text("caption,label_0\na cat,1\n")
    with pytest.raises(PairSchemaError, match=r"noimg\.csv: missing image columns.*found columns: caption, label_0"):
        open_pairs(tmp_path / "noimg.csv")
    (tmp_path / "bad.jsonl").write_text('{"caption": "a", "label_0": 1}\n{oops\n')
    with pytest.raises(PairSchemaError, match=r"bad\.jsonl:2: not valid JSON"):
        open_pairs(tmp_path / "bad.jsonl")


def test_labels_outside_the_valid_set_are_dropped_and_counted(pair_rows, tmp_path):
    rows = [dict(r) for r in pair_rows]
    rows[0]["label_0"] = 1.7
    rows[5]["label_0"] = None
    _write_parquet(rows, tmp_path / "labels.parquet")
    table = open_pairs(tmp_path / "labels.parquet")
    with pytest.raises(BadRowError, match=r"row 0: label_0 1.7 is not a number in \[0, 1\]"):
        table.load(0)
    ds = PreferenceDataset(table, 16)
    assert ds.stats["bad_labels"] == 2 and ds.stats["bad_label_rows"] == [0, 5]
    assert [ds[i]["row"] for i in range(len(ds))] == [1, 3, 4]


def test_mode_conversion_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    assert to_rgb(Image.new("L", (2, 2), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    gray16 = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert to_rgb(gray16).getpixel((0, 0)) == (255, 255, 255)


def test_prepare_image_resize_crop_flip_and_placement():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white, right half black
    img = Image.fromarray(arr)
    t, p = prepare_image(img, 10)  # resized to 10 x 20, center crop left = 5
    assert t.shape == (3, 10, 10) and t.dtype == torch.float32
    assert p.original_size == (20, 40) and p.crop_top_left == (0, 5)
    assert t[0, 5, 0].item() == pytest.approx(1.0) and t[0, 5, 9].item() == pytest.approx(-1.0)
    tf, pf = prepare_image(img, 10, flip=True)
    assert torch.equal(tf, t.flip(-1)) and pf.crop_top_left == (0, 20 - 5 - 10)
    _, pr = prepare_image(img, 10, crop_fraction=1.0)
    assert pr.crop_top_left == (0, 10)


def test_random_augmentation_depends_only_on_seed_epoch_index(pairs_parquet):
    table = open_pairs(pairs_parquet)
    a = PreferenceDataset(table, 16, crop="random", hflip=True, seed=3)
    b = PreferenceDataset(table, 16, crop="random", hflip=True, seed=3)
    order = [4, 0, 3]
    first = {i: a[i] for i in range(len(a))}
    for i in order:  # different access order (as with several workers) gives identical items
        assert torch.equal(b[i]["pixel_values"], first[i]["pixel_values"])
        assert torch.equal(b[i]["crops_top_left"], first[i]["crops_top_left"])
    crops_e0 = torch.stack([first[i]["crops_top_left"] for i in range(len(a))])
    pix_e0 = torch.stack([first[i]["pixel_values"] for i in range(len(a))])
    a.set_epoch(1)
    crops_e1 = torch.stack([a[i]["crops_top_left"] for i in range(len(a))])
    pix_e1 = torch.stack([a[i]["pixel_values"] for i in range(len(a))])
    assert not (torch.equal(crops_e0, crops_e1) and torch.equal(pix_e0, pix_e1))


def test_sdxl_placement_is_per_image(pair_rows, tmp_path):
    rows = [dict(pair_rows[0])]
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (10, 20, 30)).save(buf, format="PNG")
    rows[0]["jpg_1"] = buf.getvalue()  # loser 32 x 64 (h, w); winner is 48 x 32
    _write_parquet(rows, tmp_path / "one.parquet")
    item = PreferenceDataset(open_pairs(tmp_path / "one.parquet"), 16)[0]
    assert item["original_sizes"].tolist() == [[48, 32], [32, 64]]
    assert item["crops_top_left"].tolist() == [[(24 - 16) // 2, 0], [0, (32 - 16) // 2]]


def test_collate_shapes(pairs_parquet):
    ds = PreferenceDataset(open_pairs(pairs_parquet), 16)
    batch = collate_pairs([ds[0], ds[1], ds[2]])
    assert batch["pixel_values"].shape == (3, 2, 3, 16, 16)
    assert batch["original_sizes"].shape == (3, 2, 2) and batch["original_sizes"].dtype == torch.long
    assert batch["crops_top_left"].shape == (3, 2, 2)
    assert batch["captions"] == ["a red circle", "a blue square", "a red circle"]
    assert batch["labels"].tolist() == [1.0, 1.0, 1.0] and batch["rows"] == [0, 1, 3]
    assert float(batch["pixel_values"].min()) >= -1 and float(batch["pixel_values"].max()) <= 1


def test_jsonl_absolute_paths_and_explicit_image_dir(pairs_csv, tmp_path):
    lines = (pairs_csv / "pairs.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for r in rows:
        r["image_0"] = str(pairs_csv / "images" / r["image_0"])
    (tmp_path / "abs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table = open_pairs(tmp_path / "abs.jsonl", image_dir=pairs_csv / "images")
    rec = table.load(0)
    assert rec.image_0.size == (32, 48) and rec.label_0 == 1.0


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        open_pairs(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="not a local file or folder, and the Hugging Face Hub cannot be reached"):
        open_pairs("no-such-user/no-such-dataset")


def test_dataloader_workers_give_the_same_batches(pairs_parquet):
    from torch.utils.data import DataLoader

    ds = PreferenceDataset(open_pairs(pairs_parquet), 16, crop="random", hflip=True, seed=1)
    runs = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=2, collate_fn=collate_pairs, num_workers=workers)
        runs.append(torch.cat([b["pixel_values"] for b in loader]))
    assert runs[0].shape == (5, 2, 3, 16, 16) and torch.equal(runs[0], runs[1])


def test_bom_and_non_utf8_sources_and_jsonl_columns_named_label_something(pairs_csv, tmp_path):
    text = (pairs_csv / "pairs.csv").read_text()
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8-sig")  # Excel "CSV UTF-8"
    table = open_pairs(tmp_path / "bom.csv", image_dir=pairs_csv / "images")
    assert table.caption_column == "caption" and table.meta(1).caption == "a blue square"
    (tmp_path / "bom.jsonl").write_text((pairs_csv / "pairs.jsonl").read_text(), encoding="utf-8-sig")
    assert open_pairs(tmp_path / "bom.jsonl", image_dir=pairs_csv / "images").meta(0).label_0 == 1.0
    for name, body in (("latin1.csv", "caption,label_0,image_0,image_1\ncaf\xe9,1,a.png,b.png\n"),
                       ("latin1.jsonl", '{"caption": "caf\xe9", "label_0": 1, "image_0": "a", "image_1": "b"}\n')):
        (tmp_path / name).write_text(body, encoding="latin-1")
        with pytest.raises(PairSchemaError, match=rf"{name}: not UTF-8"):
            open_pairs(tmp_path / name)
    rows = [json.loads(line) for line in (pairs_csv / "pairs.jsonl").read_text().splitlines()]
    for r in rows:
        r["labeler"] = "alice"
    (tmp_path / "who.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table = open_pairs(tmp_path / "who.jsonl", image_dir=pairs_csv / "images")
    assert table._b.column("labeler") == ["alice"] * len(rows)
    assert table.labels().tolist() == [1.0, 0.0, 0.5, 1.0, 0.0, 1.0]


def test_an_image_file_that_cannot_be_read_is_a_bad_row(pairs_csv, monkeypatch):
    """No permission (simulated: the tests run as root, who may read anything) is a bad row of that
    file, as a missing one is, not an error that stops a training run mid-way."""
    from pathlib import Path

    real = Path.read_bytes

    def read_bytes(path):
        if path.name == "img3a.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    table = open_pairs(pairs_csv / "pairs.csv")
    with pytest.raises(BadRowError, match=r"row 3: image 0 file .*img3a.png cannot be read \(Permission denied\)"):
        table.load(3)
    assert table.load(2).caption  # the other rows read as before
