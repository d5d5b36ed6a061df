"""Session fixtures: tiny real diffusers pipelines saved to a temp folder, and tiny pair sets.

Nothing is mocked and nothing is downloaded: the pipelines are built from configs by
`ncppo.tiny` and loaded back with `from_pretrained`, exactly like a hub model.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from ncppo.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", "sd")


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory):
    """SD2.x-like: v-prediction."""
    from ncppo.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-v", "sd", "v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    from ncppo.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", "sdxl")


@pytest.fixture(scope="module")
def single_thread():
    """torch on one thread while a module runs (restored after): the tiny DiTs' kernels are too small
    to split, and two threads spin-waiting on a shared 2-core machine took 4.6x longer (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    """SD3.5-like: MMDiT (dual attention in block 0, RMS qk-norm), two CLIP encoders and T5."""
    from ncppo.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", "sd3")


@pytest.fixture(scope="session")
def tiny_sd3_no_t5_path(tmp_path_factory):
    """SD3 saved with text_encoder_3=None (model_index.json lists T5 as [null, null])."""
    from ncppo.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3-no-t5", "sd3", t5=False)


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    """FLUX.1-dev-like: double- and single-stream blocks, guidance embedding, CLIP + T5."""
    from ncppo.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux", "flux")


def png_bytes(color, size=(40, 32), fmt="PNG") -> bytes:
    """An encoded image of one flat colour with a darker square, `size` = (width, height)."""
    from PIL import Image

    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = color
    arr[h // 4 : h // 2, w // 4 : w // 2] = np.array(color) // 3
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


PAIR_ROWS = [
    # caption, colour 0, colour 1, label_0
    ("a red circle", (220, 30, 30), (30, 30, 220), 1.0),
    ("a blue square", (220, 30, 30), (30, 30, 220), 0.0),
    ("a green tree", (30, 200, 30), (200, 200, 30), 0.5),  # tie
    ("a red circle", (200, 20, 20), (20, 200, 200), 1.0),
    ("a blue square", (90, 90, 90), (20, 20, 250), 0.0),
    ("a yellow car", (230, 230, 20), (20, 20, 20), 1.0),
]


@pytest.fixture(scope="session")
def pair_rows():
    """Pick-a-Pic-schema rows: caption, jpg_0, jpg_1 (encoded bytes), label_0, label_1."""
    rows = []
    for i, (caption, c0, c1, label) in enumerate(PAIR_ROWS):
        size = (40, 32) if i % 2 else (32, 48)  # mixed sizes and aspect ratios
        rows.append(dict(caption=caption, jpg_0=png_bytes(c0, size), jpg_1=png_bytes(c1, size),
                         label_0=label, label_1=1.0 - label, image_0_uid=f"img{i}a", image_1_uid=f"img{i}b"))
    return rows


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory, pair_rows):
    """A folder holding one parquet shard of `pair_rows`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("pairs-parquet")
    pq.write_table(pa.Table.from_pylist(pair_rows), folder / "train-00000.parquet")
    return folder


@pytest.fixture(scope="session")
def pairs_csv(tmp_path_factory, pair_rows):
    """A CSV naming image files (image_0_uid / image_1_uid + .png) under an `images/` folder."""
    import csv

    folder = tmp_path_factory.mktemp("pairs-csv")
    (folder / "images").mkdir()
    for row in pair_rows:
        (folder / "images" / f"{row['image_0_uid']}.png").write_bytes(row["jpg_0"])
        (folder / "images" / f"{row['image_1_uid']}.png").write_bytes(row["jpg_1"])
    with open(folder / "pairs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["caption", "image_0_uid", "image_1_uid", "label_0"])
        writer.writeheader()
        for row in pair_rows:
            writer.writerow({k: row[k] for k in writer.fieldnames})
    with open(folder / "pairs.jsonl", "w") as fh:
        for row in pair_rows:
            fh.write(json.dumps({"caption": row["caption"], "image_0": f"{row['image_0_uid']}.png",
                                 "image_1": f"{row['image_1_uid']}.png", "label_0": row["label_0"]}) + "\n")
    return folder
