"""Data contract shared by every dataset builder.

A builder is registered in :data:`xkd.registry.DATASETS` as ``builder(cfg: DataConfig) -> DataBundle``.
Images are float32 tensors in ``[0, 1]`` of shape ``(C, H, W)``; labels are ``int``; masks, where a
dataset has them, are boolean ``(H, W)`` tensors marking the ground-truth evidence region.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from xkd.errors import DataError


@dataclass
class Batch:
    """A collated mini-batch. ``masks`` is ``None`` for datasets without ground-truth masks;
    ``indices`` are the items' positions in their dataset (what cached per-sample outputs, such as
    the teacher's logits, are read by), ``None`` for a batch built by hand."""

    images: Tensor
    labels: Tensor
    masks: Tensor | None = None
    indices: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``; copies to a GPU do not wait (from pinned memory), copies to the CPU
        do (a non-blocking copy from a GPU could be read before it has arrived)."""
        nb = torch.device(device).type == "cuda"
        move = lambda t: None if t is None else t.to(device, non_blocking=nb)  # noqa: E731
        return Batch(move(self.images), move(self.labels), move(self.masks), move(self.indices))

    def pin_memory(self) -> Batch:
        """Page-locked copies, for fast asynchronous copies to a GPU (the DataLoader calls this)."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.images), pin(self.labels), pin(self.masks), pin(self.indices))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def unit_float(images: Tensor) -> Tensor:
    """uint8 pixels (0..255) as float32 in [0, 1]: one division (one kernel per batch), equal to
    ``images.float() / 255`` to the bit, float32 whatever torch's default dtype."""
    if torch.get_default_dtype() == torch.float32:
        return images / 255.0
    return images.float().div_(255.0)


class TensorImageDataset(Dataset):
    """An in-memory split: ``images`` (N, C, H, W) float32 in [0, 1] (or uint8, scaled on access),
    ``labels`` (N,) int64 and optional ``masks`` (N, H, W) bool."""

    def __init__(self, images: Tensor, labels: Tensor, masks: Tensor | None = None) -> None:
        if images.ndim != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if masks is not None and masks.shape != (images.shape[0], *images.shape[2:]):
            raise DataError(f"masks must have shape {(images.shape[0], *images.shape[2:])}, got {tuple(masks.shape)}")
        self.images = images
        self.labels = labels.long()
        self.masks = None if masks is None else masks.bool()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int, Tensor | None]:
        img = self.images[i]
        if img.dtype == torch.uint8:
            img = unit_float(img)
        return img, int(self.labels[i]), None if self.masks is None else self.masks[i]

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """The same items held on ``device`` (images keep their dtype: uint8 data is scaled per batch,
        on the device)."""
        ds = copy.copy(self)
        ds.images, ds.labels = self.images.to(device), self.labels.to(device)
        ds.masks = None if self.masks is None else self.masks.to(device)
        return ds

    def scaled(self) -> TensorImageDataset:
        """The same items with float images in [0, 1] (uint8 images divided by 255 once, here, not
        per batch; float images are shared, not copied)."""
        if self.images.dtype != torch.uint8:
            return self
        ds = copy.copy(self)
        ds.images = unit_float(self.images)
        return ds

    def nbytes(self) -> int:
        """Bytes of the images, labels and masks."""
        tensors = [self.images, self.labels] + ([] if self.masks is None else [self.masks])
        return sum(t.numel() * t.element_size() for t in tensors)

    def batch(self, index: Tensor) -> Batch:
        """Items ``index`` as one batch, gathered by index (no per-item Python work)."""
        index = index.to(self.images.device)
        images = self.images[index]
        if images.dtype == torch.uint8:
            images = unit_float(images)
        masks = None if self.masks is None else self.masks[index]
        return Batch(images, self.labels[index], masks, index)

    def subset(self, index: Tensor) -> TensorImageDataset:
        return TensorImageDataset(
            self.images[index], self.labels[index], None if self.masks is None else self.masks[index]
        )


def collate(items: Sequence[tuple[Tensor, int, Tensor | None]], indices: Tensor | None = None) -> Batch:
    """Collate ``(image, label, mask)`` triples (the items ``indices`` of a dataset) into a :class:`Batch`."""
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    masks = None
    if items and items[0][2] is not None:
        masks = torch.stack([it[2] for it in items])
    return Batch(images, labels, masks, indices)


def fetch(dataset: Dataset, index: Tensor) -> Batch:
    """Items ``index`` of ``dataset`` as one batch: gathered by index from an in-memory dataset
    (anything with a ``batch(index)`` method), collated item by item otherwise."""
    if hasattr(dataset, "batch"):
        return dataset.batch(index)
    return collate([dataset[int(i)] for i in index], index)


def resolve_workers(num_workers: int | str, dataset: Dataset) -> int:
    """Loader processes for ``dataset``: none for in-memory data (gathered by index), ``auto``: one
    per CPU core but one, at most 8, for data that decodes lazily."""
    if hasattr(dataset, "batch"):
        return 0
    if num_workers == "auto":
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    return int(num_workers)


class BatchLoader:
    """Batches of ``dataset``, ``batch_size`` items at a time, each carrying its items' indices.

    The items come in the order ``order`` (any index sequence; default: all, in order), or, with a
    ``generator``, in a fresh permutation drawn from it at every pass. In-memory datasets are
    gathered by index in this process; other datasets (image folders that decode lazily) go through
    a :class:`~torch.utils.data.DataLoader` with ``num_workers`` processes. With ``pin_memory``, batches
    on the CPU come page-locked either way (for copies to a GPU that do not wait).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        order: Tensor | Sequence[int] | None = None,
        *,
        generator: torch.Generator | None = None,
        num_workers: int | str = 0,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}; set the batch size to a positive integer")
        self.dataset = dataset
        self.batch_size = batch_size
        n = len(dataset)  # type: ignore[arg-type]
        self.order = torch.arange(n) if order is None else torch.as_tensor(order, dtype=torch.long)
        self.generator = generator
        self.num_workers = resolve_workers(num_workers, dataset)
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = self.order
        if self.generator is not None:
            order = order[torch.randperm(len(order), generator=self.generator)]
        held = getattr(getattr(self.dataset, "images", None), "device", None)
        if held is not None and held.type != "cpu":  # data held on a GPU: index it there, one copy per pass
            order = order.to(held)
        chunks = order.split(self.batch_size)
        if hasattr(self.dataset, "batch"):
            for index in chunks:
                b = self.dataset.batch(index)
                # pinned, the copy to the GPU does not make the host wait (from pageable memory it does)
                yield b.pin_memory() if self.pin_memory and b.images.device.type == "cpu" else b
            return
        yield from DataLoader(
            _Indexed(self.dataset),
            batch_sampler=[c.tolist() for c in chunks],
            collate_fn=_collate_indexed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )


class _Indexed(Dataset):
    """``dataset`` whose items carry their index (for :class:`BatchLoader`'s worker path)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, tuple]:
        return i, self.dataset[i]


def _collate_indexed(items: Sequence[tuple[int, tuple]]) -> Batch:
    return collate([it for _, it in items], torch.tensor([i for i, _ in items], dtype=torch.long))


@dataclass
class DataBundle:
    """What every dataset builder returns.

    Attributes:
        name: registry name of the dataset.
        train, val, test: map-style datasets yielding ``(image, label, mask_or_None)``.
        class_names: one readable name per class, index = label.
        image_shape: ``(C, H, W)`` of every image.
        has_masks: whether items carry ground-truth masks.
        skipped_files: files that could not be read and were skipped (imagefolder), for the log
            and the report.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    image_shape: tuple[int, int, int]
    has_masks: bool = False
    skipped_files: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return self.image_shape[0]


def dataset_labels(dataset: Any) -> Tensor:
    """The labels of a split, as a flat long tensor on the CPU: its ``labels`` tensor (xkd's datasets),
    else read item by item."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor):
        return labels.detach().to("cpu", torch.long).flatten()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def stratified_split(labels: Tensor, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Split indices into len(fractions) parts, class by class, deterministically from ``seed``.

    Every class is shuffled with a seeded generator and cut by the cumulative fractions, so each
    part holds (up to rounding) the same class proportions as the whole.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must sum to 1, got {list(fractions)}")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in fractions]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = len(idx)
        bounds = [0]
        acc = 0.0
        for f in fractions[:-1]:
            acc += f
            bounds.append(round(acc * n))
        bounds.append(n)
        for k in range(len(fractions)):
            parts[k].append(idx[bounds[k] : bounds[k + 1]])
    return [torch.sort(torch.cat(p)).values if p else torch.empty(0, dtype=torch.long) for p in parts]


def take_subset(ds: TensorImageDataset, size: int | None, seed: int) -> TensorImageDataset:
    """A class-stratified, seeded subset of exactly ``size`` items (all items if ``size`` is None).

    Each class gets its share of ``size`` by largest remainder (so the shares add up exactly and
    follow the class proportions), then a seeded random sample of that many of its items.
    """
    if size is None or size >= len(ds):
        return ds
    if size <= 0:
        raise DataError(f"subset size must be positive, got {size}")
    classes, counts = torch.unique(ds.labels, return_counts=True)
    exact = counts.double() * size / len(ds)
    quota = exact.floor().long()
    short = size - int(quota.sum())
    if short:
        order = torch.argsort(exact - quota, descending=True, stable=True)
        quota[order[:short]] += 1
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        idx = torch.nonzero(ds.labels == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:q]])
    return ds.subset(torch.sort(torch.cat(picked)).values)
