"""``imagefolder``: a user's folder of images, one sub-folder per class.

Layouts (class names = sorted folder names):

- ``root/<class>/*.png|jpg|jpeg|bmp|tif|tiff`` — split 70/20/10 (train/val/test), class-stratified
  and deterministic from ``data.seed`` (the layout of the brain-tumour, eye-disease and Alzheimer
  sets of KD-FMV);
- ``root/{train,val,test}/<class>/...`` — used as given; without ``val/``, 10% of ``train/`` is
  carved out as validation (stratified, seeded).

Optional ground-truth masks live in a twin tree, ``root/masks/<class>/<stem>.<ext>`` (or
``root/masks/<split>/<class>/...``); any non-zero mask pixel is inside. When ``masks/`` exists,
every image must have a mask (the error lists the first missing ones).

Decisions: images are decoded once at build time and kept in memory as uint8 (``data.image_size``
keeps that small for large sets). An unreadable or corrupt image is **skipped**: it is counted in
the log and listed in the run record and the report; if every file of a class is unreadable, that
is an error. Channels: ``data.params.channels`` (1 or 3); by default 1 when the first readable image
is grayscale, else 3. Without ``data.image_size`` all images must share one size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from xkd.config import DataConfig
from xkd.data.base import DataBundle, DataError, TensorImageDataset, stratified_split
from xkd.data.builtin import check_image_size, check_params, finish_bundle, split_tensors
from xkd.registry import DATASETS

log = logging.getLogger("xkd")

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "masks" and not p.name.startswith("."))


def _read(path: Path, channels: int, size: tuple[int, int] | None, resize: bool) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if resize and size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _find_mask(mask_dir: Path, stem: str) -> Path | None:
    for ext in EXTENSIONS:
        p = mask_dir / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _load_tree(
    folder: Path,
    class_names: list[str],
    mask_root: Path | None,
    channels: int | None,
    size: int | None,
    skipped: list[str],
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """Decode every image under ``folder/<class>/``; returns images, labels, masks, channels."""
    arrays, labels, masks, missing = [], [], [], []
    shape: tuple[int, int] | None = (size, size) if size else None
    for k, name in enumerate(class_names):
        cdir = folder / name
        files = _images_in(cdir) if cdir.is_dir() else []
        if not files:
            raise DataError(f"class folder {cdir} has no images ({', '.join(EXTENSIONS)}); add images or remove it")
        read = 0
        for f in files:
            try:
                if channels is None:
                    with Image.open(f) as probe:
                        channels = 1 if probe.mode in GRAY_MODES else 3
                arr = _read(f, channels, shape, resize=size is not None)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                skipped.append(str(f))
                log.debug("skipping unreadable image %s (%s)", f, e)
                continue
            if shape is None:
                shape = arr.shape[1:]
            elif arr.shape[1:] != shape:
                raise DataError(
                    f"images have different sizes ({f}: {arr.shape[2]}x{arr.shape[1]}, others {shape[1]}x{shape[0]}); "
                    "set data.image_size to resize them all"
                )
            if mask_root is not None:
                mp = _find_mask(mask_root / name, f.stem)
                if mp is None:
                    missing.append(str(f))
                    continue
                with Image.open(mp) as m:
                    m = m.convert("L").resize((arr.shape[2], arr.shape[1]), Image.NEAREST)
                    masks.append(np.asarray(m) > 0)
            arrays.append(arr)
            labels.append(k)
            read += 1
        if read == 0 and not missing:
            raise DataError(f"no image in {cdir} could be read (all {len(files)} are corrupt or unsupported)")
    if missing:
        raise DataError(
            f"{len(missing)} image(s) have no mask under {mask_root}, e.g. {', '.join(missing[:3])}; add a mask "
            "<masks>/<class>/<same name>.png for each image, or remove the masks folder"
        )
    images = torch.from_numpy(np.stack(arrays))
    mask_t = torch.from_numpy(np.stack(masks)) if mask_root is not None else None
    return images, torch.tensor(labels, dtype=torch.long), mask_t, int(channels or 1)


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> DataBundle:
    """Build a dataset from ``cfg.root`` (see the module docstring for layouts and decisions)."""
    params = check_params(cfg, {"channels": None})
    channels = params["channels"]
    if channels not in (None, 1, 3):
        raise DataError(f"data.params.channels must be 1 or 3, got {channels!r}")
    size = check_image_size(cfg)
    if cfg.root is None:
        raise DataError("dataset 'imagefolder' needs data.root: a folder with one sub-folder of images per class")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} does not exist; point it at a folder with one sub-folder per class")
    skipped: list[str] = []
    pre_split = (root / "train").is_dir() and (root / "test").is_dir()
    top = root / "train" if pre_split else root
    class_names = [p.name for p in _class_dirs(top)]
    if not class_names:
        raise DataError(f"{root} holds no class folders; put the images of each class in root/<class_name>/")
    if len(class_names) < 2:
        raise DataError(f"{root} has a single class folder ({class_names[0]}); a classifier needs at least 2")
    masks_dir = root / "masks"
    has_masks = masks_dir.is_dir()
    if pre_split:
        parts = {}
        for split in SPLITS:
            if (root / split).is_dir():
                mroot = (masks_dir / split) if has_masks else None
                images, labels, masks, channels = _load_tree(root / split, class_names, mroot, channels, size, skipped)
                parts[split] = TensorImageDataset(images, labels, masks)
        if "val" not in parts:
            tr = parts["train"]
            keep, val = stratified_split(tr.labels, [0.9, 0.1], cfg.seed)
            parts["train"], parts["val"] = tr.subset(keep), tr.subset(val)
        train, val, test = parts["train"], parts["val"], parts["test"]
    else:
        images, labels, masks, channels = _load_tree(
            root, class_names, masks_dir if has_masks else None, channels, size, skipped
        )
        train, val, test = split_tensors(images, labels, masks, (0.7, 0.2, 0.1), cfg.seed)
    if skipped:
        log.warning("imagefolder: skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])
    return finish_bundle(cfg, train, val, test, class_names, has_masks=has_masks, skipped_files=skipped)
