"""The training data path: pair source -> dataset -> deterministic, resumable dataloader.

An item is a pure function of (seed, epoch, index): the sampler yields `(epoch, index)` keys and
`EpochItems` hands the epoch to the dataset with every key. So the random crop and flip of an
item do not depend on which DataLoader worker draws it, on persistent workers (whose dataset copy
was forked in epoch 0), nor on whether the run was resumed: a resumed run sees the same batches
as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import InputError

DEFAULT_RESOLUTION = 512


class EpochSampler(Sampler[tuple[int, int]]):
    """A seeded permutation of range(n), different each epoch and a pure function of
    (seed, epoch), yielding `(epoch, index)` keys: a resumed run sees the same order (and the same
    augmentation draws) without replaying the loader."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch
        if not self.shuffle:
            return ((epoch, i) for i in range(self.n))
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return ((epoch, i) for i in torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class EpochItems(Dataset):
    """`dataset` looked up by `(epoch, index)` keys: sets the epoch (crop/flip draws) of the
    dataset copy that serves the key, in whichever process that copy lives."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if getattr(self.dataset, "epoch", None) != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def build_dataset(config):
    """The dataset `config.data` names: a latent cache, or pair rows read through `open_pairs`.

    Resolves `config.resolution` in place: None becomes the cache's resolution (or 512 for
    images); a given value that conflicts with a cache's is an error naming both.
    """
    from ..data.cache import LatentCacheDataset, is_latent_cache, partial_cache_reason

    if is_latent_cache(config.data):
        dataset = LatentCacheDataset(config.data, hflip=config.hflip, keep_ties=config.keep_ties, seed=config.seed)
        if config.resolution is not None and config.resolution != dataset.resolution:
            raise InputError(f"--resolution {config.resolution} conflicts with the latent cache --data {config.data}, "
                             f"built at {dataset.resolution} px: drop --resolution or rebuild the cache")
        config.resolution = dataset.resolution  # validation and eval images are drawn at it too
        cached_from = dataset.info.get("model")
        if cached_from and cached_from != config.model:
            warnings.warn(f"--data {config.data} was cached with model {cached_from!r}, training {config.model!r}: "
                          "its latents (and text embeddings) must come from the same VAE (and text encoders)")
        return dataset
    reason = partial_cache_reason(config.data)
    if reason:
        raise InputError(f"--data {config.data}: {reason}")
    from ..data.dataset import PreferenceDataset
    from ..data.pairs import open_pairs

    if config.resolution is None:
        config.resolution = DEFAULT_RESOLUTION
    table = open_pairs(config.data, split=config.split, image_dir=config.image_dir)
    return PreferenceDataset(table, config.resolution, crop=config.crop, hflip=config.hflip,
                             keep_ties=config.keep_ties, seed=config.seed)


def usable_pairs(dataset, config) -> int:
    """Pairs the run draws from: all of them, or the first --max-train-samples."""
    n = len(dataset)
    return n if config.max_train_samples is None else min(n, config.max_train_samples)


def build_dataloader(config, num_processes: int = 1):
    """(dataset, dataloader, sampler); batches are `collate_pairs` dicts of `config.batch_size` pairs.

    Fails before any model is loaded when the pairs do not fill one batch on every process.
    """
    from ..data.dataset import collate_pairs

    dataset = build_dataset(config)
    n = usable_pairs(dataset, config)
    needed = config.batch_size * num_processes
    if n < needed:
        limit = "" if config.max_train_samples is None else f" (--max-train-samples {config.max_train_samples})"
        raise InputError(f"--data {config.data}: {n} usable pair(s){limit}, fewer than one batch "
                         f"(--batch-size {config.batch_size} x {num_processes} process(es) = {needed}); "
                         "ties are dropped unless --keep-ties (see `ncppo data check`)")
    sampler = EpochSampler(n, config.seed)
    loader = DataLoader(EpochItems(dataset), batch_size=config.batch_size, sampler=sampler, collate_fn=collate_pairs,
                        num_workers=config.dataloader_num_workers, drop_last=True,
                        persistent_workers=config.dataloader_num_workers > 0,
                        pin_memory=torch.cuda.is_available())
    return dataset, loader, sampler


def fingerprint(dataset) -> str:
    """A short hash of what the pairs are (count, and row/caption/label of up to 1,000 of them),
    independent of where the data lives, so a moved folder keeps its fingerprint."""
    n = len(dataset)
    digest = hashlib.sha256(f"{type(dataset).__name__}|{n}|{getattr(dataset, 'resolution', '')}".encode())
    meta = getattr(dataset, "meta", None)
    if callable(meta):
        for i in range(0, n, max(1, n // 1000)):
            digest.update(repr(meta(i)).encode())
    return digest.hexdigest()[:16]


def describe(dataset, config) -> dict:
    """Manifest entry for the data: source, counts and a fingerprint of captions/labels."""
    stats = dict(getattr(dataset, "stats", {}) or {})
    return {"source": config.data, "split": config.split, "pairs": len(dataset), "fingerprint": fingerprint(dataset),
            "stats": stats}

