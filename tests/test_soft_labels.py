"""Soft labels (label_0 anywhere in [0, 1]) through `data check`, `data curate`, `data cache` and
`train`: every stage reads them as they are, orients each pair winner first with
p = max(label_0, 1 - label_0), and the trained loss is conservative DPO with that p."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ncppo.data.cache import LatentCacheDataset, cache_latents
from ncppo.data.check import check_pairs
from ncppo.data.curate import curate, curate_rows
from ncppo.data.dataset import PreferenceDataset, collate_pairs
from ncppo.data.pairs import open_pairs, parse_label
from ncppo.data.transforms import prepare_image

from conftest import png_bytes

R = 32
# (prompt, image 0, image 1, label_0); images named per prompt
ROWS = [
    ("p", "a", "b", 0.8),  # 0  a > b (soft)
    ("p", "c", "a", 0.3),  # 1  a > c (soft, image 1 preferred)
    ("q", "d", "e", 1.0),  # 2  d > e
    ("q", "f", "d", 0.0),  # 3  d > f
    ("q", "e", "f", 0.5),  # 4  tie
    ("r", "g", "h", 0.2),  # 5  h > g (soft)
    ("r", "h", "i", 0.6),  # 6  h > i (soft)
    ("r", "i", "g", 0.7),  # 7  i > g: i lost to h, so not an absolute winner
    ("p", "b", "c", 0.4),  # 8  c > b: c lost to a
    ("p", "b", "a", 0.2),  # 9  a > b with p 0.8 again: row 0 swapped (a duplicate)
    ("p", "a", "c", 1.5),  # 10 bad label: outside [0, 1]
]
COLORS = {}


def _color(prompt, name):
    key = (prompt, name)
    if key not in COLORS:
        i = len(COLORS) + 1
        COLORS[key] = (i * 53 % 256, i * 97 % 256, i * 31 % 256)
    return COLORS[key]


def _rows():
    return [dict(caption=p, jpg_0=png_bytes(_color(p, a)), jpg_1=png_bytes(_color(p, b)), label_0=label,
                 image_0_uid=f"{p}{a}", image_1_uid=f"{p}{b}") for p, a, b, label in ROWS]


@pytest.fixture(scope="module")
def soft_parquet(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("soft")
    pq.write_table(pa.Table.from_pylist(_rows()), folder / "train-00000.parquet")
    return folder


def oriented(label_0: float) -> float:
    return max(label_0, 1.0 - label_0)


def test_parse_label_accepts_any_number_in_0_1():
    assert [parse_label(v) for v in (0.8, "0.25", 1, 0, 0.5, 1 - 1e-9, 1e-9)] == [0.8, 0.25, 1.0, 0.0, 0.5, 1.0, 0.0]
    assert [parse_label(v) for v in (1.5, -0.2, float("nan"), float("inf"), "x", None, b"1")] == [None] * 7


def test_check_counts_soft_labels_and_flags_only_bad_ones(soft_parquet):
    report = check_pairs(soft_parquet, progress=False)
    assert report.counts["bad_label"] == 1 and [e["row"] for e in report.examples["bad_label"]] == [10]
    assert report.soft_labels == 7
    assert report.labels == {"0.0": 1, "0.5": 1, "1.0": 1, "1.5": 1, "soft (0, 0.5)": 4, "soft (0.5, 1)": 3}
    assert report.counts["tie"] == 1
    # row 9 is row 0 with the images swapped and the label flipped: the same comparison
    assert [e["row"] for e in report.examples.get("duplicate_pair", [])] == [9]
    assert report.to_dict()["soft_labels"] == 7 and "soft labels" in report.summary()


@pytest.mark.parametrize("dedupe", [False, True])
def test_curate_reads_soft_labels_as_wins_and_keeps_them(dedupe, soft_parquet, tmp_path):
    # wins: p a 3/0/0 (rows 0, 1, 9), b 0/3/0, c 1/1/0; q d 2/0/0, e 0/1/1, f 0/1/1; r h 2/0/0, i 1/1/0, g 0/2/0
    expected_rows = [0, 1, 2, 3, 5, 6] + ([] if dedupe else [9])
    kept, stats = curate_rows(_rows(), rule="absolute-winners", dedupe=dedupe)
    assert [r["label_0"] for r in kept] == [ROWS[i][3] for i in expected_rows]
    assert [(r["image_0_uid"], r["image_1_uid"]) for r in kept] == [
        (ROWS[i][0] + ROWS[i][1], ROWS[i][0] + ROWS[i][2]) for i in expected_rows]
    assert stats["absolute_winners"] == 3 and stats["bad_labels"] == 1 and stats["ties"] == 1
    assert stats["duplicates_dropped"] == (1 if dedupe else 0)
    # on disk: the shards keep the soft values, and `drop-ties` keeps every decisive pair
    stats = curate(soft_parquet, tmp_path / "out", rule="drop-ties", progress=False)
    assert stats["rows_after"] == 9
    assert open_pairs(tmp_path / "out").labels().tolist() == [r[3] for r in ROWS if r[3] not in (0.5, 1.5)]


def test_curate_dedupe_keeps_the_same_images_with_another_probability():
    rows = _rows()[:1] * 2
    rows[1] = dict(rows[1], label_0=0.9)  # a > b again, but with p 0.9: another judgement, kept
    kept, stats = curate_rows(rows, rule="none", dedupe=True)
    assert [r["label_0"] for r in kept] == [0.8, 0.9] and stats["duplicates_dropped"] == 0


def test_dataset_orients_soft_pairs_and_collates_their_probabilities(soft_parquet):
    table = open_pairs(soft_parquet)
    ds = PreferenceDataset(table, R)
    assert [int(r) for r in ds.indices] == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # tie and bad label dropped
    assert ds.stats["soft_labels"] == 7 and ds.stats["bad_labels"] == 1 and ds.stats["ties_dropped"] == 1
    items = [ds[i] for i in range(len(ds))]
    assert [it["label"] for it in items] == pytest.approx([oriented(ROWS[i][3]) for i in ds.indices])
    for it in items:  # the preferred image comes first
        p, a, b, label = ROWS[it["row"]]
        first = a if label > 0.5 else b
        expected, _ = prepare_image(table.load(it["row"]).image_0 if label > 0.5 else table.load(it["row"]).image_1, R)
        assert torch.equal(it["pixel_values"][0], expected), (it["row"], first)
    batch = collate_pairs(items)
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([0.8, 0.7, 1.0, 1.0, 0.8, 0.6, 0.7, 0.6, 0.8])
    # a kept tie: image 0 first, item label 0.5, loss target 1 (as before soft labels)
    ties = PreferenceDataset(table, R, keep_ties=True)
    tie = ties[[int(r) for r in ties.indices].index(4)]
    assert tie["label"] == 0.5 and collate_pairs([tie])["labels"].tolist() == [1.0]
    from ncppo.train.data import fingerprint

    assert fingerprint(ds) != fingerprint(PreferenceDataset(table, R, keep_ties=True))


@pytest.fixture(scope="module")
def soft_cache(tiny_sd_path, soft_parquet, tmp_path_factory):
    from ncppo.models import load_model

    sd = load_model(str(tiny_sd_path))
    out = tmp_path_factory.mktemp("soft-cache") / "cache"
    info = cache_latents(soft_parquet, sd, out, resolution=R, keep_ties=True, batch_size=4, progress=False)
    return sd, out, info


def test_cache_stores_oriented_probabilities_and_swapped_latents(soft_cache, soft_parquet):
    sd, out, info = soft_cache
    assert info["pairs"] == 10 and info["dataset_stats"]["soft_labels"] == 7
    cached = LatentCacheDataset(out)  # the tie is dropped at read time, as for hard labels
    assert len(cached) == 9 and cached.stats["soft_labels"] == 7 and cached.stats["ties_dropped"] == 1
    images = PreferenceDataset(open_pairs(soft_parquet), R)
    lat, img = collate_pairs([cached[i] for i in range(9)]), collate_pairs([images[i] for i in range(9)])
    assert lat["rows"] == img["rows"] and torch.equal(lat["labels"], img["labels"])
    pix = img["pixel_values"]
    expected = sd.encode_images(pix.flatten(0, 1)).unflatten(0, pix.shape[:2])
    assert torch.allclose(lat["latents"], expected, atol=1e-5, rtol=0)
    with_tie = LatentCacheDataset(out, keep_ties=True)
    assert len(with_tie) == 10 and collate_pairs([with_tie[4]])["labels"].tolist() == [1.0]


def softplus(x):
    return math.log1p(math.exp(x)) if x < 30 else x


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_training_loss_is_conservative_dpo_with_the_rows_labels(tiny_sd_path, soft_cache, tmp_path, monkeypatch, eps):
    """Each micro-step's loss is p softplus(-x) + (1 - p) softplus(x), with p the row's oriented label
    (smoothed) and x its logits (B = 1: the logged reward margin times beta); a run that ignored the
    label would train the hard softplus(-x)."""
    import ncppo.train.loop as loop
    from ncppo.train.config import TrainConfig

    _, cache, _ = soft_cache
    steps = []
    real_step = loop.preference_step

    def recording(*args, **kwargs):
        out = real_step(*args, **kwargs)
        batch = args[3]
        steps.append((batch["rows"], kwargs["beta"], out.loss.item(), {k: v.item() for k, v in out.metrics.items()}))
        return out

    monkeypatch.setattr(loop, "preference_step", recording)
    config = TrainConfig(model=str(tiny_sd_path), data=str(cache), output_dir=str(tmp_path / "run"), batch_size=1, lora_rank=4, max_steps=4,
                         learning_rate=5e-2, report_to="none", checkpoint_every=0, log_every=1, beta=1e4, seed=0,
                         space="latent", objective="dpo", label_smoothing=eps)
    loop.train(config)
    assert len(steps) == 4
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    apart = 0
    for (rows, beta, value, metrics), log in zip(steps, logged):
        p = oriented(ROWS[rows[0]][3])
        p = p * (1 - eps) + (1 - p) * eps
        x = metrics["reward_margin"] * beta
        expected = p * softplus(-x) + (1 - p) * softplus(x)
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-6), (rows, p, x)
        assert log["loss"] == pytest.approx(value, rel=1e-6) and log["label_mean"] == pytest.approx(p, rel=1e-6)
        if abs((1 - p) * x) > 1e-3:  # far enough from x = 0 to tell the hard loss apart
            assert value != pytest.approx(softplus(-x), rel=1e-4, abs=1e-6)
            apart += 1
    # step 1 has x = 0 (LoRA starts as the base); rows 9, 0, 2, 3 are drawn, step 2 (row 0, p 0.8) is a
    # soft one past x = 0, and with smoothing the hard rows of steps 3 and 4 too
    assert [s[0][0] for s in steps] == [9, 0, 2, 3]
    assert apart == (1 if eps == 0 else 3), [(s[0], s[2], s[3]["reward_margin"] * s[1]) for s in steps]


def test_label_smoothing_flag_is_validated():
    from ncppo.configs import ConfigError
    from ncppo.train.config import TrainConfig

    for eps in (-0.1, 0.5):
        with pytest.raises(ConfigError, match=r"--label-smoothing must be in \[0, 0.5\)"):
            TrainConfig(model="m", data="d", output_dir="o", label_smoothing=eps).validate()
    TrainConfig(model="m", data="d", output_dir="o", label_smoothing=0.1).validate()
