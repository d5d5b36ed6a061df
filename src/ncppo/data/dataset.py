"""The training dataset: oriented pairs (winner first), ties dropped, bad rows skipped and named.

Labels: `label_0` is the probability that image 0 is preferred, in [0, 1]. A pair is oriented so
its first image is the more preferred one (label_0 < 0.5 swaps the images) and its item `label` is
p = max(label_0, 1 - label_0) in (0.5, 1], the probability the loss gives the first image (1 for
hard labels). A kept tie (0.5) keeps image 0 first with `label` 0.5, and its loss target stays 1
(`collate_pairs`' `labels`): ties train as a hard win of image 0, as before soft labels.

Random crops and flips are drawn from a generator seeded by (seed, epoch, index), so an item does
not depend on the number of DataLoader workers or on what was read before it: resume is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .pairs import BadRowError, PairRecord, PairTable
from .transforms import prepare_image


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs of `table` as training items (see `__getitem__`).

    Ties (label 0.5) are dropped unless `keep_ties`; rows whose label is missing or outside [0, 1]
    are dropped up front. Both counts are in `stats`, with `soft_labels` (kept labels other than 0,
    0.5 and 1). A row that fails to decode is replaced by the next good
    row (deterministically) and reported in the item's `skipped` list as (row, reason).
    """

    def __init__(self, table: PairTable, resolution: int, *, crop: str = "center", hflip: bool = False,
                 keep_ties: bool = False, seed: int = 0, max_consecutive_bad: int = 100):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.table, self.resolution = table, int(resolution)
        self.crop, self.hflip, self.keep_ties, self.seed = crop, bool(hflip), bool(keep_ties), int(seed)
        self.max_consecutive_bad = max_consecutive_bad
        self.epoch = 0
        labels = table.labels()
        bad = np.isnan(labels)
        ties = labels == 0.5
        keep = ~bad & (self.keep_ties | ~ties)
        self.indices = np.flatnonzero(keep)
        self.labels = labels[self.indices]
        self.stats: dict[str, Any] = {
            "rows": int(len(labels)),
            "pairs": int(len(self.indices)),
            "ties": int(ties.sum()),
            "ties_dropped": int(0 if self.keep_ties else ties.sum()),
            "bad_labels": int(bad.sum()),
            "bad_label_rows": [int(r) for r in np.flatnonzero(bad)[:20]],
            "soft_labels": int(((self.labels > 0) & (self.labels < 1) & (self.labels != 0.5)).sum()),
        }
        if len(self.indices) == 0:
            raise InputError(f"{table.source}: no usable pairs ({self.stats['rows']} rows, "
                             f"{self.stats['ties_dropped']} ties dropped, {self.stats['bad_labels']} bad labels)")

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Changes the random crops/flips drawn for every index (call once per epoch)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{pixel_values (2,3,R,R) in [-1,1] winner first, caption, label (p in (0.5, 1], the probability
        that the first image is preferred; 0.5 for a kept tie),
        original_sizes (2,2) (h, w), crops_top_left (2,2) (top, left), row, skipped}."""
        n = len(self)
        skipped: list[tuple[int, str]] = []
        for attempt in range(min(n, self.max_consecutive_bad + 1)):
            k = (int(index) + attempt) % n
            try:
                record = self.table.load(int(self.indices[k]))
            except BadRowError as err:
                skipped.append((err.row, err.reason))
                continue
            item = self.make_item(record, self._rng(index))
            item["skipped"] = skipped
            return item
        rows = ", ".join(f"row {r} ({why})" for r, why in skipped[:5])
        raise InputError(f"{self.table.source}: {len(skipped)} consecutive bad rows from index {index}: {rows}")

    def make_item(self, record: PairRecord, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Orient a decoded pair (winner first) and transform both images (crop/flip from `rng`)."""
        if record.label_0 < 0.5:
            images, label = (record.image_1, record.image_0), 1.0 - float(record.label_0)
        else:
            images, label = (record.image_0, record.image_1), float(record.label_0)
        crop_fraction, flip = None, False
        if rng is not None:
            # one draw per pair: same-size images get the same crop and the same flip
            u, f = rng.random(2)
            crop_fraction = float(u) if self.crop == "random" else None
            flip = bool(self.hflip and f < 0.5)
        pixels, sizes, crops = [], [], []
        for img in images:
            tensor, placement = prepare_image(img, self.resolution, crop_fraction=crop_fraction, flip=flip)
            pixels.append(tensor)
            sizes.append(placement.original_size)
            crops.append(placement.crop_top_left)
        return {
            "pixel_values": torch.stack(pixels),
            "caption": record.caption,
            "label": label,
            "original_sizes": torch.tensor(sizes, dtype=torch.long),
            "crops_top_left": torch.tensor(crops, dtype=torch.long),
            "row": int(record.row),
            "skipped": [],
        }

    def meta(self, index: int):
        """Caption/label/row of item `index` without decoding images (a `PairMeta`)."""
        return self.table.meta(int(self.indices[int(index)]))

    def load_item(self, index: int) -> dict[str, Any]:
        """Item `index` without replacement of a bad row (raises BadRowError); used by the cache."""
        record = self.table.load(int(self.indices[int(index)]))
        item = self.make_item(record, self._rng(index))
        return item


_STACKED = ("pixel_values", "latents", "latents_flipped", "original_sizes", "crops_top_left",
            "encoder_hidden_states", "pooled_prompt_embeds")


def loss_target(label: float) -> float:
    """The probability the loss gives an item's first image: its `label`, but 1 for a kept tie
    (0.5), which trains as a win of image 0."""
    return 1.0 if label == 0.5 else float(label)


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items: pixel_values (B,2,3,R,R) or latents (B,2,C,h,w), captions, labels (B,) (the loss
    targets: each item's `label`, 1 for a kept tie; see `loss_target`),
    original_sizes (B,2,2), crops_top_left (B,2,2), rows, skipped (all items' bad rows); with cached
    text embeddings also `conditioning` (a models.Conditioning)."""
    if not items:
        raise ValueError("collate_pairs: empty batch")
    batch: dict[str, Any] = {}
    for key in _STACKED:
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    if "encoder_hidden_states" in batch:  # cached text embeddings: the trainer skips the text encoders
        from ..models.base import Conditioning

        batch["conditioning"] = Conditioning(batch["encoder_hidden_states"], batch.get("pooled_prompt_embeds"))
    batch["captions"] = [it["caption"] for it in items]
    batch["labels"] = torch.tensor([loss_target(it.get("label", 1.0)) for it in items], dtype=torch.float32)
    batch["rows"] = [it["row"] for it in items]
    batch["skipped"] = [s for it in items for s in it.get("skipped", [])]
    return batch
