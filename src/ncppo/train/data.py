"""The training data path: pair source -> dataset -> deterministic, resumable dataloader."""

from __future__ import annotations

import hashlib
import warnings

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """A seeded permutation of range(n), different each epoch and a pure function of
    (seed, epoch): a resumed run sees the same order without replaying the loader."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def build_dataset(config, adapter=None):
    """The dataset `config.data` names: a latent cache, or pair rows read through `open_pairs`."""
    from ..data.cache import LatentCacheDataset, is_latent_cache

    if is_latent_cache(config.data):
        dataset = LatentCacheDataset(config.data, hflip=config.hflip, keep_ties=config.keep_ties, seed=config.seed)
        cached_from = dataset.info.get("model")
        if cached_from and cached_from != config.model:
            warnings.warn(f"--data {config.data} was cached with model {cached_from!r}, training {config.model!r}: "
                          "its latents (and text embeddings) must come from the same VAE (and text encoders)")
        return dataset
    from ..data.dataset import PreferenceDataset
    from ..data.pairs import open_pairs

    table = open_pairs(config.data, split=config.split, image_dir=config.image_dir)
    return PreferenceDataset(table, config.resolution, crop=config.crop, hflip=config.hflip,
                             keep_ties=config.keep_ties, seed=config.seed)


def build_dataloader(config, adapter=None):
    """(dataset, dataloader, sampler); batches are `collate_pairs` dicts of `config.batch_size` pairs."""
    from ..data.dataset import collate_pairs

    dataset = build_dataset(config, adapter)
    n = len(dataset) if config.max_train_samples is None else min(len(dataset), config.max_train_samples)
    if n == 0:
        raise ValueError(f"--data {config.data}: no usable pairs (ties dropped: see `ncppo data check`)")
    sampler = EpochSampler(n, config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collate_pairs,
                        num_workers=config.dataloader_num_workers, drop_last=True,
                        persistent_workers=config.dataloader_num_workers > 0)
    return dataset, loader, sampler


def describe(dataset, config) -> dict:
    """Manifest entry for the data: source, counts and a fingerprint of captions/labels."""
    stats = dict(getattr(dataset, "stats", {}) or {})
    n = len(dataset)
    digest = hashlib.sha256(f"{config.data}|{config.split}|{n}".encode())
    meta = getattr(dataset, "meta", None)
    if callable(meta):
        for i in range(0, n, max(1, n // 1000)):
            digest.update(repr(meta(i)).encode())
    return {"source": config.data, "split": config.split, "pairs": n, "fingerprint": digest.hexdigest()[:16],
            "stats": stats}
