"""Datasets: registered builders returning a :class:`DataBundle`, and the loader helper.

``import xkd.data`` registers every built-in dataset in :data:`xkd.registry.DATASETS`.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from xkd.config import DataConfig
from xkd.data import builtin, concepts, imagefolder, lesions  # noqa: F401  (registers the builders)
from xkd.data.base import Batch, BatchLoader, DataBundle, DataError, TensorImageDataset, collate, fetch
from xkd.data.lesions import LESION_CLASSES, generate_lesions
from xkd.registry import DATASETS

__all__ = [
    "LESION_CLASSES",
    "Batch",
    "BatchLoader",
    "DataBundle",
    "DataError",
    "TensorImageDataset",
    "build_dataset",
    "collate",
    "fetch",
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
) -> BatchLoader:
    """Batches (:class:`Batch`, with the items' indices) of ``dataset``, shuffled reproducibly from ``seed``.

    Args:
        dataset: a map-style dataset of ``(image, label, mask_or_None)`` items.
        batch_size: items per batch (the last batch may be smaller).
        shuffle: reshuffle every pass; the order depends only on ``seed`` and the pass number.
        seed: seed of the loader's own generator.
        num_workers: worker processes for datasets that decode lazily (0 loads in the main process).
        sampler: a custom sampler (its indices, in its order); then ``shuffle`` must be False.
    """
    if sampler is not None and shuffle:
        raise DataError("make_loader got both a sampler and shuffle=True; pass shuffle=False with a sampler")
    order = None if sampler is None else list(sampler)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return BatchLoader(dataset, batch_size, order, generator=generator, num_workers=num_workers)
