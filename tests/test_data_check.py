"""`ncppo data check` finds every planted defect of a small hand-made dataset and names its row."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ncppo.data.check import check_pairs, count_caption_tokens


def _img(mode, color, size=(24, 16), fmt="PNG"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


RED, BLUE, GREEN = _img("RGB", (200, 0, 0)), _img("RGB", (0, 0, 200)), _img("RGB", (0, 200, 0))
LONG = " ".join(["word"] * 80)

# row: (caption, jpg_0, jpg_1, label_0, label_1) -> the defect planted in it
ROWS = [
    ("a red cat", RED, BLUE, 1.0, 0.0),                       # 0 clean
    ("a cat", RED, BLUE, 1.7, -0.7),                          # 1 bad_label (outside [0, 1])
    ("a dog", b"\x89PNG\r\n\x1a\n garbage", BLUE, 1.0, 0.0),  # 2 undecodable_image
    ("a dog", RED, b"", 0.0, 1.0),                            # 3 empty_image
    ("a tree", RED, GREEN, 0.5, 0.5),                         # 4 tie
    ("a house", _img("RGBA", (1, 2, 3, 4)), BLUE, 1.0, 0.0),  # 5 unusual_mode RGBA
    ("a house", RED, _img("L", 100), 0.0, 1.0),               # 6 unusual_mode L
    ("a car", _img("CMYK", (0, 0, 0, 0), fmt="JPEG"), BLUE, 1.0, 0.0),  # 7 unusual_mode CMYK
    ("", RED, GREEN, 1.0, 0.0),                               # 8 empty_caption
    (LONG, RED, GREEN, 1.0, 0.0),                             # 9 long_caption (80 words)
    ("a red cat", BLUE, RED, 0.0, 1.0),                       # 10 duplicate of row 0 (swapped + flipped)
    ("a green cat", GREEN, GREEN, 1.0, 0.0),                  # 11 same_image_twice
    ("a blue cat", RED, BLUE, 1.0, 1.0),                      # 12 label_1_mismatch
    ("a big dog", _img("RGB", (9, 9, 9), size=(600, 700)), BLUE, 1.0, 0.0),  # 13 clean, large image
]

EXPECTED = {
    "bad_label": [1], "undecodable_image": [2], "empty_image": [3], "missing_image": [],
    "tie": [4], "unusual_mode": [5, 6, 7], "empty_caption": [8], "long_caption": [9],
    "duplicate_pair": [10], "same_image_twice": [11], "label_1_mismatch": [12],
    "small_image": [],
}


def main(argv):
    """`ncppo` with only the data commands registered (other packages may be mid-build)."""
    import argparse

    from ncppo.data.commands import register

    parser = argparse.ArgumentParser(prog="ncppo")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def defects_parquet(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(caption=c, jpg_0=a, jpg_1=b, label_0=l0, label_1=l1) for c, a, b, l0, l1 in ROWS]
    path = tmp_path_factory.mktemp("check") / "defects.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)  # several batches
    return path


def test_every_planted_defect_is_found_by_row(defects_parquet):
    report = check_pairs(defects_parquet, batch_size=4, progress=False)
    assert report.rows == 14
    assert report.prompts == 11
    for kind, rows in EXPECTED.items():
        assert report.counts[kind] == len(rows), kind
        assert [e["row"] for e in report.examples.get(kind, [])] == rows, kind
    assert report.error_rows == 3 and report.error_rate == pytest.approx(3 / 14)
    assert report.modes == {"RGB": 23, "RGBA": 1, "L": 1, "CMYK": 1}  # 28 images - 1 garbage - 1 empty
    assert report.short_side == {"0-255": 25, "512-767": 1}
    assert report.labels == {"0.0": 3, "0.5": 1, "1.7": 1, "1.0": 9}
    assert report.soft_labels == 0
    assert [e["row"] for e in report.first_errors()] == [1, 2, 3]


def test_resolution_flags_small_images(defects_parquet):
    report = check_pairs(defects_parquet, resolution=32, progress=False)
    # every 24x16 image that decodes (25 of them) is small; the 600x700 one is not
    assert report.counts["small_image"] == 25


def test_caption_token_count_is_a_clip_lower_bound():
    assert count_caption_tokens("A cat, sitting on 2 mats!!") == 8  # a, cat, ",", sitting, on, 2, mats, "!!"
    from ncppo.tiny import build_tokenizer

    tok = build_tokenizer()
    caption = "a red cat and a dog"
    exact = count_caption_tokens(caption, tok)
    assert exact >= count_caption_tokens(caption) == 6


def test_cli_exit_status_json_and_first_rows(defects_parquet, tmp_path, capsys):
    out = tmp_path / "report.json"
    status = main(["data", "check", str(defects_parquet), "--json", str(out), "--max-error-rate", "0.1"])
    assert status == 1
    err = capsys.readouterr().err
    assert "3 of 14 rows" in err and "row 1: label_0 1.7 is not a number in [0, 1]" in err and "row 2: image 0 cannot be decoded" in err
    report = json.loads(out.read_text())
    assert report["errors"] == {"bad_label": 1, "undecodable_image": 1, "empty_image": 1, "missing_image": 0}
    assert report["warnings"]["unusual_mode"] == 3
    assert main(["data", "check", str(defects_parquet), "--max-error-rate", "0.25"]) == 0
    assert main(["data", "check", str(defects_parquet), "--limit", "1"]) == 0


def test_missing_image_files_of_a_csv_source(pairs_csv, tmp_path):
    import shutil

    folder = tmp_path / "csv"
    shutil.copytree(pairs_csv, folder)
    (folder / "images" / "img4b.png").unlink()
    report = check_pairs(folder / "pairs.csv", progress=False)
    assert report.rows == 6 and report.counts["missing_image"] == 1
    assert report.examples["missing_image"][0]["row"] == 4
    assert report.counts["tie"] == 1 and report.examples["tie"][0]["row"] == 2
