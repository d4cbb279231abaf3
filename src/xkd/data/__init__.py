"""Datasets: registered builders returning a :class:`DataBundle`, and the loader helper.

``import xkd.data`` registers every built-in dataset in :data:`xkd.registry.DATASETS`.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from xkd.config import DataConfig
from xkd.data import builtin, concepts, imagefolder, lesions  # noqa: F401  (registers the builders)
from xkd.data.base import Batch, DataBundle, DataError, TensorImageDataset, collate
from xkd.data.lesions import LESION_CLASSES, generate_lesions
from xkd.registry import DATASETS

__all__ = [
    "LESION_CLASSES",
    "Batch",
    "DataBundle",
    "DataError",
    "TensorImageDataset",
    "build_dataset",
    "collate",
    "generate_lesions",
    "make_loader",
]


def build_dataset(cfg: DataConfig) -> DataBundle:
    """Build the dataset ``cfg.name`` (a name registered in :data:`~xkd.registry.DATASETS`).

    Raises:
        DataError: if the name is not registered or the builder cannot build the data as configured.
    """
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset {cfg.name!r}; set data.name to one of: {', '.join(DATASETS.names())}")
    return DATASETS.get(cfg.name)(cfg)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A :class:`DataLoader` yielding :class:`Batch` objects, shuffled reproducibly from ``seed``.

    Args:
        dataset: a map-style dataset of ``(image, label, mask_or_None)`` items.
        batch_size: items per batch (the last batch may be smaller).
        shuffle: reshuffle every epoch; the order depends only on ``seed`` and the epoch number.
        seed: seed of the loader's own generator (also seeds the workers' base seed).
        num_workers: worker processes (0 loads in the main process).
        sampler: a custom sampler; then ``shuffle`` must be False.
    """
    if sampler is not None and shuffle:
        raise DataError("make_loader got both a sampler and shuffle=True; pass shuffle=False with a sampler")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}; set the batch size to a positive integer")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
