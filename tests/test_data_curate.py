"""`ncppo data curate` returns exactly the hand-derived pairs, in memory and streaming in shards."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ncppo.data.curate import curate, curate_rows
from ncppo.data.pairs import open_pairs

# (prompt, image 0, image 1, label_0). Images are named by uid; the same uid under another prompt
# is another image (identity is per prompt).
ROWS = [
    ("p1", "a", "b", 0.0),  # 0  b > a
    ("p1", "b", "c", 0.0),  # 1  c > b          chain a < b < c
    ("p1", "c", "d", 1.0),  # 2  c > d
    ("p2", "e", "f", 1.0),  # 3  e > f
    ("p2", "e", "g", 0.5),  # 4  e ~ g (tie: e is not an absolute winner)
    ("p2", "h", "f", 1.0),  # 5  h > f
    ("p3", "i", "j", 0.0),  # 6  j > i
    ("p3", "j", "i", 0.0),  # 7  i > j          (contradiction: nobody wins absolutely)
    ("p3", "k", "l", 0.5),  # 8  tie only
    ("p4", "a", "n", 1.0),  # 9  a > n          (a lost under p1 but is absolute under p4)
    ("p1", "d", "c", 0.0),  # 10 c > d again: a duplicate of row 2 with the images swapped
    ("p2", "h", "e", 1.3),  # 11 bad label (outside [0, 1]): dropped
]
# Tallies (row 11 ignored): p1 a 0/1/0, b 1/1/0, c 3/0/0, d 0/2/0; p2 e 1/0/1, f 0/2/0, g 0/0/1,
# h 1/0/0; p3 i 1/1/0, j 1/1/0, k, l ties; p4 a 1/0/0, n 0/1/0. Absolute winners: p1 c, p2 h, p4 a.
# Pairs as (prompt, winner, loser):
EXPECTED = {
    ("direct", False): [("p1", "c", "b"), ("p1", "c", "d"), ("p2", "h", "f"), ("p4", "a", "n"), ("p1", "c", "d")],
    ("direct", True): [("p1", "c", "b"), ("p1", "c", "d"), ("p2", "h", "f"), ("p4", "a", "n")],
    ("latest", False): [("p2", "h", "f"), ("p4", "a", "n"), ("p1", "c", "d")],  # c's last win is row 10
    ("latest", True): [("p1", "c", "d"), ("p2", "h", "f"), ("p4", "a", "n")],  # row 10 removed: row 2
    # + the pair in which c's loser b beat a (row 0); d and f and n beat nobody
    ("add-loser-losers", True): [("p1", "b", "a"), ("p1", "c", "b"), ("p1", "c", "d"), ("p2", "h", "f"),
                                 ("p4", "a", "n")],
    # + a new pair c vs a (b, c's loser, beat a)
    ("add-losers-of-loser", True): [("p1", "c", "b"), ("p1", "c", "d"), ("p2", "h", "f"), ("p4", "a", "n"),
                                    ("p1", "c", "a")],
}
DROP_TIES = [0, 1, 2, 3, 5, 6, 7, 9, 10]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(with_uids: bool = True):
    names = sorted({(p, x) for p, a, b, _ in ROWS for x in (a, b)})
    pixels = {key: _png(i) for i, key in enumerate(names)}  # one distinct image per (prompt, uid)
    rows = []
    for p, a, b, label in ROWS:
        row = dict(caption=p, jpg_0=pixels[(p, a)], jpg_1=pixels[(p, b)], label_0=label, label_1=1 - label)
        if with_uids:
            row.update(image_0_uid=a, image_1_uid=b)
        rows.append(row)
    return rows, {v: k[1] for k, v in pixels.items()}


def _pairs(rows, names):
    """(prompt, winner, loser) of kept rows, read back from the image bytes."""
    out = []
    for r in rows:
        w, l = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1.0 else (r["jpg_1"], r["jpg_0"])
        out.append((r["caption"], names[w], names[l]))
    return out


@pytest.mark.parametrize("with_uids", [True, False], ids=["uids", "byte-hashes"])
@pytest.mark.parametrize("variant,dedupe", sorted(EXPECTED))
def test_in_memory_curation_gives_the_hand_derived_pairs(variant, dedupe, with_uids):
    rows, names = _rows(with_uids)
    kept, stats = curate_rows(rows, rule="absolute-winners", pairs=variant, dedupe=dedupe, batch_size=5)
    got = _pairs(kept, names)
    expected = EXPECTED[(variant, dedupe)]
    if variant == "latest":  # written in row order
        assert sorted(got) == sorted(expected)
    else:
        assert got == expected
    assert stats["absolute_winners"] == 3 and stats["bad_labels"] == 1
    assert stats["rows_before"] == 12 and stats["prompts_before"] == 4
    assert stats["duplicates_dropped"] == (1 if dedupe else 0)
    assert stats["rows_after"] == len(expected)


def test_drop_ties_and_none_rules():
    rows, names = _rows()
    kept, stats = curate_rows(rows, rule="drop-ties")
    assert _pairs(kept, names) == _pairs([rows[i] for i in DROP_TIES], names)
    assert stats["ties"] == 2 and stats["prompts_after"] == 4
    kept, stats = curate_rows(rows, rule="none", dedupe=True)
    assert len(kept) == 10  # 12 - bad label - duplicate


@pytest.mark.parametrize("variant", ["direct", "add-losers-of-loser"])
def test_streaming_in_chunks_and_shards_matches_in_memory(variant, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, names = _rows()
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:7]), src / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[7:]), src / "train-00001-of-00002.parquet")
    stats = curate(src, tmp_path / "out", pairs=variant, dedupe=True, chunk_rows=2, shard_rows=2, progress=False)
    expected = EXPECTED[(variant, True)]
    shards = sorted((tmp_path / "out").glob("*.parquet"))
    n = (len(expected) + 1) // 2
    assert [s.name for s in shards] == [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    back = [r for s in shards for r in pq.read_table(s).to_pylist()]
    assert _pairs(back, names) == expected
    assert pq.read_schema(shards[0]).names == list(rows[0].keys())
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert saved["rows_after"] == len(expected) == stats["rows_after"]
    assert (saved["prompts_before"], saved["prompts_after"]) == (4, 3)
    assert not (tmp_path / "out" / ".spill").exists()
    # the output is a valid pair source again
    table = open_pairs(tmp_path / "out")
    assert len(table) == len(expected)
    first = table.meta(0)  # source row 1: b vs c, c wins
    assert (first.caption, first.uid_0, first.uid_1, first.label_0) == ("p1", "b", "c", 0.0)
    with pytest.raises(FileExistsError, match="use --overwrite"):
        curate(src, tmp_path / "out", progress=False)


def test_csv_source_writes_absolute_image_paths(pairs_csv, tmp_path):
    stats = curate(pairs_csv / "pairs.csv", tmp_path / "out", rule="drop-ties", progress=False)
    assert stats["rows_after"] == 5 and stats["ties"] == 1
    table = open_pairs(tmp_path / "out")
    assert table.image_columns == ("image_0", "image_1")
    rec = table.load(1)  # source row 1, label 0
    assert rec.label_0 == 0.0 and rec.caption == "a blue square" and rec.image_0.size == (40, 32)


def test_cli_curate_from_a_save_to_disk_folder(pair_rows, tmp_path):
    import argparse

    import datasets

    from ncppo.data.commands import register

    datasets.Dataset.from_list(pair_rows).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "curate.yaml").write_text("rule: drop-ties\nshard-rows: 2\n")
    parser = argparse.ArgumentParser(prog="ncppo")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "curate", str(tmp_path / "disk"), "--out", str(tmp_path / "out"),
                              "--config", str(tmp_path / "curate.yaml"), "--shard-rows", "3"])
    assert args.func(args) == 0
    shards = sorted((tmp_path / "out").glob("train-*.parquet"))
    assert [s.name for s in shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]  # 5 rows / 3
    table = open_pairs(tmp_path / "out")
    assert len(table) == 5 and [table.meta(i).caption for i in range(5)] == [
        r["caption"] for r in pair_rows if r["label_0"] != 0.5]
    rec = table.load(1)
    assert rec.image_0.tobytes() == Image.open(io.BytesIO(pair_rows[1]["jpg_0"])).convert("RGB").tobytes()


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def test_missing_files_null_images_and_blank_label_1_are_skipped_counted_and_named(pairs_csv, tmp_path, capsys):
    import shutil

    folder = tmp_path / "csv"
    shutil.copytree(pairs_csv, folder)
    (folder / "images" / "img3a.png").unlink()
    for rule in ("drop-ties", "none", "absolute-winners"):
        stats = curate(folder / "pairs.csv", tmp_path / f"out-{rule}", rule=rule, progress=False)
        assert stats["bad_rows"] == 1 and stats["bad_row_examples"][0]["row"] == 3, stats
        assert "image 0 file 'img3a' not found" in stats["bad_row_examples"][0]["detail"]
        assert stats["rows_before"] == 6
    assert stats["valid_rows_before"] == 5
    assert curate(folder / "pairs.csv", tmp_path / "o2", rule="drop-ties", progress=False)["rows_after"] == 4
    # a blank label_1 (CSV) is a bad row too
    for name, color in (("a", "red"), ("b", "blue"), ("c", "green")):
        (tmp_path / f"{name}.png").write_bytes(_png(color))
    (tmp_path / "l1.csv").write_text("caption,label_0,label_1,image_0,image_1\nx,1,,a.png,b.png\ny,0,1,b.png,c.png\n")
    stats = curate(tmp_path / "l1.csv", tmp_path / "o3", rule="none", progress=False)
    assert stats["rows_after"] == 1 and stats["bad_rows"] == 1
    assert stats["bad_row_examples"] == [{"row": 0, "detail": "label_1 '' is not a number in [0, 1]"}]
    # a null image in a bytes source without uids: its identity cannot be taken
    rows = [{"caption": "p", "jpg_0": _png("red"), "jpg_1": None, "label_0": 1.0},
            {"caption": "p", "jpg_0": _png("red"), "jpg_1": _png("blue"), "label_0": 1.0}]
    kept, stats = curate_rows(rows)
    assert len(kept) == 1 and stats["bad_rows"] == 1 and stats["bad_row_examples"][0]["row"] == 0
    assert "image 1 is missing" in stats["bad_row_examples"][0]["detail"]
    # --rule none without --dedupe needs no identity: the row passes through untouched
    kept, stats = curate_rows(rows, rule="none")
    assert len(kept) == 2 and stats["bad_rows"] == 0 and stats["images"] is None


def test_null_image_of_a_synthesized_pair_is_skipped_and_counted():
    # with uids, identity needs no bytes. p: b > a, c > b -> c absolute; add-losers-of-loser would
    # synthesize (c, a), but a's image is null
    rows = [{"caption": "p", "jpg_0": None, "jpg_1": _png("blue"), "image_0_uid": "a", "image_1_uid": "b",
             "label_0": 0.0},
            {"caption": "p", "jpg_0": _png("blue"), "jpg_1": _png("green"), "image_0_uid": "b", "image_1_uid": "c",
             "label_0": 0.0}]
    kept, stats = curate_rows(rows, pairs="add-losers-of-loser")
    assert stats["synthesized_pairs"] == 0 and stats["bad_rows"] == 1 and len(kept) == 1
    assert stats["bad_row_examples"][0]["row"] == 0 and "synthesized pair skipped" in stats["bad_row_examples"][0]["detail"]


def test_out_that_is_holds_or_lies_inside_the_source_is_refused(pairs_csv, pair_rows, tmp_path, capsys):
    import shutil

    from ncppo.cli import main

    from test_cli_errors import fails

    folder = tmp_path / "src"
    shutil.copytree(pairs_csv, folder)
    (folder / "pairs.jsonl").unlink()  # one table in the folder
    before = sorted(p.name for p in folder.rglob("*"))
    for out, where in ((folder, "is the source"), (tmp_path, "contains the source"),
                       (folder / "images" / "o", "lies inside --image-dir")):
        source = folder if out == folder else folder / "pairs.csv"
        fails(capsys, ["data", "curate", str(source), "--out", str(out), "--overwrite",
                       "--image-dir", str(folder / "images")], f"--out {out} {where}")
    fails(capsys, ["data", "curate", str(folder), "--out", str(folder / "o")], "lies inside the source")
    assert sorted(p.name for p in folder.rglob("*")) == before
