"""``imagefolder``: a user's own images, one sub-folder per class, with optional ground-truth masks.

Layouts (class names = sorted folder names; hidden folders and ``masks`` are never classes):

* ``root/<class>/*.{png,jpg,jpeg,bmp,tif,tiff}`` -- split 70/20/10, class-stratified, seeded by
  ``data.seed`` (the layout of the brain-tumour, eye-disease and Alzheimer sets of KD-FMV).
* ``root/{train,val,test}/<class>/...`` -- already split; ``train`` is required. A missing ``val``
  and/or ``test`` is carved from ``train`` (10 % of ``train`` each, stratified, seeded). Any other
  folder next to the split folders is an error (mixed layouts are almost always a mistake).

Masks (optional): ``root/masks/<class>/<stem>.<ext>`` (or ``root/masks/<split>/<class>/...``) with the
same stem as the image; any non-zero pixel is evidence (palette images: any non-zero index). If
``masks/`` exists, every image must have a mask of the same size as the image, otherwise a
:class:`DataError` names the first missing ones -- half-masked data would silently bias mask metrics.

Concept masks (optional, for network dissection): ``root/concepts/<category>/<concept>/<class>/<stem>.<ext>``
(or ``.../<concept>/<split>/<class>/...`` for pre-split data), e.g. ``concepts/texture/stripes/cat/img1.png``.
Every split then has :attr:`~ConceptFolderDataset.concept_names`, ``concept_categories`` and
``concept_masks(i)`` (``(K, H, W)`` bool, read on access). An image without a mask file for a
concept does not show that concept (Broden's convention: concepts are sparse); a mask of another
size than its image, or an unreadable one, is a :class:`DataError`. A concept without any positive
pixel is reported by the dissection, never divided by.

Decisions:

* Channels (``params.channels``): 1 or 3; by default 1 when every image is grayscale (PIL modes
  1, L, LA, I, I;16*, F) and 3 otherwise. 16-bit images are scaled to 8 bits.
* Size: ``data.image_size`` resizes every image (bilinear, antialiased) and mask (nearest) to a
  square. Without it all images must have the same size, else a :class:`DataError` says to set
  ``data.image_size``.
* Corrupt or unreadable files are skipped, listed in ``DataBundle.skipped_files`` and counted in a
  warning on the ``xkd`` logger (a corrupt mask skips its image too). All files unreadable, or a
  class left without images, is an error.
* Storage (``params.in_memory``): decoded images are kept in memory as uint8 when they fit in
  512 MiB (or when ``in_memory: true``); otherwise (or ``in_memory: false``) a lazy dataset decodes
  each file on access. Every file is decoded once at build time either way, so a corrupt file is
  found before training rather than in the middle of an epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from xkd.config import DataConfig
from xkd.data.base import DataBundle, DataError, TensorImageDataset, stratified_split, unit_float
from xkd.data.builtin import SPLIT_70_20_10, check_image_size, check_params, finish_bundle, resize_images, resize_masks
from xkd.registry import DATASETS

log = logging.getLogger("xkd")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
SPLITS = ("train", "val", "test")
RESERVED = ("masks", "concepts")  # folders of the root that are never classes
DEFAULTS = {"channels": None, "in_memory": None}
MEMORY_BUDGET = 512 * 2**20
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
_LAYOUT_FIX = "use root/<class_name>/<image> or root/{train,val,test}/<class_name>/<image>"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _to_array(im: Image.Image, channels: int) -> np.ndarray:
    """Decoded pixels as uint8 ``(H, W, channels)``."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or arr.max(initial=0) > 255:  # 16-bit data -> 8 bits
            arr = arr / 257.0
        arr = np.rint(np.clip(arr, 0, 255)).astype(np.uint8)[..., None]
        return np.repeat(arr, 3, -1) if channels == 3 else arr
    arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def load_image(path: str | Path, channels: int, size: tuple[int, int]) -> Tensor:
    """Decode ``path`` to a uint8 ``(channels, H, W)`` tensor resized to ``size`` ``(H, W)``."""
    with Image.open(path) as im:
        im.load()
        arr = _to_array(im, channels)
    x = torch.from_numpy(arr.transpose(2, 0, 1).copy())  # PIL arrays are read-only
    if tuple(x.shape[1:]) != size:
        x = resize_images(x[None], size)[0]
    return x


def load_mask(path: str | Path, size: tuple[int, int]) -> Tensor:
    """Decode a mask file to a bool ``(H, W)`` tensor: any non-zero pixel (or palette index) is True."""
    with Image.open(path) as im:
        im.load()
        if im.mode == "P" or im.mode in GRAY_MODES:
            arr = np.asarray(im)
            arr = (arr[..., 0] if arr.ndim == 3 else arr) != 0
        else:
            arr = np.asarray(im.convert("RGB")).any(-1)
    m = torch.from_numpy(np.ascontiguousarray(arr))
    if tuple(m.shape) != size:
        m = resize_masks(m[None], size)[0]
    return m


class ImageFolderDataset(Dataset):
    """A lazy split: decodes ``files[i]`` (and its mask) on every access; uint8 is scaled to [0, 1]."""

    def __init__(
        self, files: list[str], labels: Tensor, masks: list[str] | None, channels: int, size: tuple[int, int]
    ) -> None:
        self.files, self.labels, self.mask_files = list(files), labels.long(), masks
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int, Tensor | None]:
        img = unit_float(load_image(self.files[i], self.channels, self.size))
        mask = None if self.mask_files is None else load_mask(self.mask_files[i], self.size)
        return img, int(self.labels[i]), mask

    def subset(self, index: Tensor) -> ImageFolderDataset:
        idx = index.tolist()
        masks = None if self.mask_files is None else [self.mask_files[i] for i in idx]
        return ImageFolderDataset([self.files[i] for i in idx], self.labels[index], masks, self.channels, self.size)


def _scan(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, str]]]]:
    """Class names and, per split found on disk (``all`` if not pre-split), ``(image, class)`` pairs."""
    folders = [p for p in _subfolders(root) if p.name not in RESERVED]
    names = {p.name for p in folders}
    if not folders:
        loose = " (it holds images directly: move them into one sub-folder per class)" if _images_in(root) else ""
        raise DataError(f"data.root {str(root)!r} holds no class folders{loose}; {_LAYOUT_FIX}")
    if "train" in names:
        other = sorted(names - set(SPLITS))
        if other:
            raise DataError(
                f"data.root {str(root)!r} mixes split folders (train) with other folders ({', '.join(other)}); "
                f"{_LAYOUT_FIX}"
            )
        layout = {s: root / s for s in SPLITS if s in names}
    elif names & {"val", "test"}:
        raise DataError(f"data.root {str(root)!r} has val/test folders but no train folder; add root/train")
    else:
        layout = {"all": root}
    found: dict[str, list[tuple[Path, str]]] = {}
    classes: set[str] = set()
    for split, folder in layout.items():
        class_dirs = [p for p in _subfolders(folder) if not (split == "all" and p.name in RESERVED)]
        if not class_dirs:
            raise DataError(f"{str(folder)!r} holds no class folders; {_LAYOUT_FIX}")
        found[split] = []
        for d in class_dirs:
            files = _images_in(d)
            if not files:
                raise DataError(
                    f"class folder {d} has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it"
                )
            found[split] += [(f, d.name) for f in files]
            classes.add(d.name)
    if "train" in found:
        train_classes = {c for _, c in found["train"]}
        for split in ("val", "test"):
            extra = sorted({c for _, c in found.get(split, [])} - train_classes)
            if extra:
                raise DataError(f"class(es) {', '.join(extra)} appear in {split} but not in train; add them to train")
    if len(classes) < 2:
        raise DataError(
            f"data.root {str(root)!r} has {len(classes)} class ({', '.join(sorted(classes))}); imagefolder needs "
            f"at least 2 class sub-folders"
        )
    return sorted(classes), found


class ConceptFolderDataset(Dataset):
    """A split of ``imagefolder`` with concept masks from ``root/concepts`` (module docstring):
    items as the wrapped split's; ``concept_files[i][k]`` is item ``i``'s mask of concept ``k`` (None:
    the concept is absent from that image)."""

    def __init__(
        self,
        base: Dataset,
        concept_files: list[list[str | None]],
        names: list[str],
        categories: dict[str, str],
        size: tuple[int, int],
    ) -> None:
        self.base, self.concept_files, self.size = base, concept_files, size
        self.concept_names, self.concept_categories = list(names), dict(categories)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int, Tensor | None]:
        return self.base[i]

    def __getattr__(self, name: str) -> object:  # labels, masks, images ... of the wrapped split
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def concept_masks(self, i: int) -> Tensor:
        """Boolean ``(K, H, W)`` masks of item ``i``, one per concept of :attr:`concept_names`."""
        empty = torch.zeros(self.size, dtype=torch.bool)
        return torch.stack([empty if f is None else load_mask(f, self.size) for f in self.concept_files[i]])

    def subset(self, index: Tensor) -> ConceptFolderDataset:
        files = [self.concept_files[i] for i in index.tolist()]
        return ConceptFolderDataset(
            self.base.subset(index), files, self.concept_names, self.concept_categories, self.size
        )


def _concept_folders(root: Path) -> list[tuple[str, str, Path]]:
    """``(category, concept, folder)`` of every concept under ``root/concepts`` (empty if none)."""
    top = root / "concepts"
    if not top.is_dir():
        return []
    found = [(cat.name, c.name, c) for cat in _subfolders(top) for c in _subfolders(cat)]
    if not found:
        raise DataError(
            f"{str(top)!r} holds no concept folders; use concepts/<category>/<concept>/<class>/<image stem>.png "
            "(e.g. concepts/texture/stripes/...) or remove it"
        )
    names = [c for _, c, _ in found]
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise DataError(
            f"concept(s) {', '.join(twice)} appear under several categories in {str(top)!r}; name them apart"
        )
    return found


def _concept_files(
    concepts: list[tuple[str, str, Path]], split: str, kept: list[tuple[Path, str]], size_of: dict[Path, tuple]
) -> list[list[str | None]]:
    """Per kept image ``(file, class)``, the mask file of each concept (None where it has none)."""
    per_concept = []
    for _, _name, folder in concepts:
        base = folder if split == "all" else folder / split
        by_stem: dict[tuple[str, str], Path] = {}
        for cls in sorted({c for _, c in kept}):
            d = base / cls
            for f in sorted(_images_in(d) if d.is_dir() else [], key=lambda q: q.suffix.lower() != ".png"):
                by_stem.setdefault((cls, f.stem), f)
        files = []
        for f, c in kept:
            m = by_stem.get((c, f.stem))
            if m is not None:
                try:
                    _, hw = _header(m)
                except _READ_ERRORS as e:
                    raise DataError(f"concept mask {str(m)!r} cannot be read ({e}); replace or remove it") from None
                if hw != size_of[f]:
                    raise DataError(
                        f"concept mask {str(m)!r} is {hw[1]}x{hw[0]} but its image {str(f)!r} is "
                        f"{size_of[f][1]}x{size_of[f][0]}; make every concept mask the size of its image"
                    )
            files.append(None if m is None else str(m))
        per_concept.append(files)
    return [list(row) for row in zip(*per_concept)] if per_concept else [[] for _ in kept]


def _find_masks(root: Path, split: str, items: list[tuple[Path, str]]) -> list[Path] | None:
    """The mask of every image of ``split`` (None when there is no ``masks/`` folder)."""
    mask_root = root / "masks"
    if not mask_root.is_dir():
        return None
    if split != "all":
        mask_root = mask_root / split
    by_stem: dict[tuple[str, str], Path] = {}
    for cls in sorted({c for _, c in items}):
        folder = mask_root / cls
        # .png first: a stem with several mask files uses the lossless one
        for f in sorted(_images_in(folder) if folder.is_dir() else [], key=lambda p: p.suffix.lower() != ".png"):
            by_stem.setdefault((cls, f.stem), f)
    masks = [by_stem.get((c, f.stem)) for f, c in items]
    missing = [f"{c}/{f.name}" for (f, c), m in zip(items, masks) if m is None]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) have no mask in {str(mask_root)!r} (first: {', '.join(missing[:5])}); every "
            f"image needs <masks>/<class>/<same stem>.png -- add the missing masks or remove the masks folder"
        )
    return masks  # type: ignore[return-value]


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    with Image.open(path) as im:
        return im.mode, (im.height, im.width)


Entry = tuple[Path, int, Path | None, tuple[int, int]]
"""An image file, its label, its mask file (or None) and its (height, width) from the header."""


def _read_headers(
    root: Path, found: dict[str, list[tuple[Path, str]]], index: dict[str, int], skipped: list[str]
) -> tuple[dict[str, list[Entry]], set[str]]:
    """Pass 1, headers only (cheap): every readable image of each split with its mask, and the images'
    modes; unreadable files go to ``skipped``."""
    entries: dict[str, list[Entry]] = {}
    modes: set[str] = set()
    for split, items in found.items():
        masks = _find_masks(root, split, items)
        entries[split] = []
        for k, (f, c) in enumerate(items):
            mask = None if masks is None else masks[k]
            try:
                mode, hw = _header(f)
            except _READ_ERRORS:
                skipped.append(str(f))
                continue
            if mask is not None:
                try:
                    _, mask_hw = _header(mask)
                except _READ_ERRORS:
                    skipped += [str(mask), str(f)]
                    continue
                if mask_hw != hw:
                    raise DataError(
                        f"mask {str(mask)!r} is {mask_hw[1]}x{mask_hw[0]} but its image {str(f)!r} is {hw[1]}x{hw[0]}; "
                        f"make every mask the size of its image"
                    )
            modes.add(mode)
            entries[split].append((f, index[c], mask, hw))
    return entries, modes


def _common_size(entries: list[Entry], image_size: int | None) -> tuple[int, int]:
    """The size every image is loaded at: ``data.image_size``, or the images' own when they all agree."""
    if image_size is not None:
        return image_size, image_size
    size = entries[0][3]
    odd = next((e for e in entries if e[3] != size), None)
    if odd is not None:
        raise DataError(
            f"images differ in size ({entries[0][0].name} is {size[1]}x{size[0]}, {odd[0].name} is "
            f"{odd[3][1]}x{odd[3][0]}); set data.image_size (e.g. data.image_size=64) to resize them all"
        )
    return size


def _decode_split(
    es: list[Entry], channels: int, size: tuple[int, int], in_memory: bool, skipped: list[str]
) -> tuple[Dataset, list[tuple[Path, int, Path | None]]]:
    """Pass 2 for one split: decode every file once, so corrupt pixel data is found now, not
    mid-training; the split's dataset (in memory or decoded lazily) and the files kept."""
    kept, pixels, masks = [], [], []
    for f, label, mask, _ in es:
        try:
            img = load_image(f, channels, size)
        except _READ_ERRORS:
            skipped.append(str(f))
            continue
        try:
            m = None if mask is None else load_mask(mask, size)
        except _READ_ERRORS:
            skipped += [str(mask), str(f)]
            continue
        kept.append((f, label, mask))
        if in_memory:
            pixels.append(img)
            masks.append(m)
    labels = torch.tensor([k[1] for k in kept], dtype=torch.long)
    has_masks = bool(kept) and kept[0][2] is not None
    if in_memory:
        images = torch.stack(pixels) if pixels else torch.empty((0, channels, *size), dtype=torch.uint8)
        return TensorImageDataset(images, labels, torch.stack(masks) if has_masks else None), kept
    mask_files = [str(k[2]) for k in kept] if has_masks else None
    return ImageFolderDataset([str(k[0]) for k in kept], labels, mask_files, channels, size), kept


def _root_of(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise DataError(
            "dataset 'imagefolder' needs data.root: set data.root to a folder with one sub-folder per class"
        )
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root {str(root)!r} does not exist or is not a folder; set data.root to your image folder"
        )
    return root


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> DataBundle:
    """A folder of the user's images (see the module docstring for layouts and decisions).

    Params: ``channels`` (1 or 3; default from the images), ``in_memory`` (true/false; default:
    in memory when the decoded uint8 images fit in 512 MiB).
    """
    p = check_params(cfg, DEFAULTS)
    if p["channels"] not in (None, 1, 3):
        raise DataError(f"data.params.channels must be 1 or 3, got {p['channels']!r}; set it to 1 or 3 or remove it")
    if p["in_memory"] not in (None, True, False):
        raise DataError(f"data.params.in_memory must be true or false, got {p['in_memory']!r}")
    image_size = check_image_size(cfg)
    root = _root_of(cfg)
    class_names, found = _scan(root)
    concepts = _concept_folders(root)
    index = {c: i for i, c in enumerate(class_names)}
    skipped: list[str] = []

    entries, modes = _read_headers(root, found, index, skipped)
    channels = p["channels"] or (1 if modes <= GRAY_MODES else 3)
    all_entries = [e for es in entries.values() for e in es]
    if not all_entries:
        raise DataError(f"none of the {len(skipped)} image files under {str(root)!r} could be read; check the files")
    size = _common_size(all_entries, image_size)
    in_memory = p["in_memory"]
    if in_memory is None:
        in_memory = len(all_entries) * channels * size[0] * size[1] <= MEMORY_BUDGET

    datasets: dict[str, Dataset] = {}
    for split, es in entries.items():
        datasets[split], kept = _decode_split(es, channels, size, in_memory, skipped)
        if concepts:
            sizes = {f: hw for f, _, _, hw in es}
            files = _concept_files(concepts, split, [(k[0], class_names[k[1]]) for k in kept], sizes)
            names, categories = [c for _, c, _ in concepts], {c: cat for cat, c, _ in concepts}
            datasets[split] = ConceptFolderDataset(datasets[split], files, names, categories, size)
    if skipped:
        log.warning("imagefolder: skipped %d unreadable file(s) under %s (first: %s)", len(skipped), root, skipped[0])

    first = datasets.get("train", datasets.get("all"))
    present = set(first.labels.tolist())
    lost = [c for c in class_names if index[c] not in present]
    if lost:
        raise DataError(
            f"no training image of class(es) {', '.join(lost)} could be read ({len(skipped)} file(s) skipped, first "
            f"{skipped[0] if skipped else '-'}); replace the corrupt files"
        )
    if "all" in datasets:
        train, val, test = (first.subset(i) for i in stratified_split(first.labels, SPLIT_70_20_10, cfg.seed))
    else:
        missing = [s for s in ("val", "test") if s not in datasets]
        cut = stratified_split(first.labels, [1.0 - 0.1 * len(missing)] + [0.1] * len(missing), cfg.seed)
        datasets["train"] = first.subset(cut[0])
        for s, idx in zip(missing, cut[1:]):
            datasets[s] = first.subset(idx)
        train, val, test = datasets["train"], datasets["val"], datasets["test"]
    has_masks = getattr(train, "masks", None) is not None or getattr(train, "mask_files", None) is not None
    return finish_bundle(cfg, train, val, test, class_names, has_masks=has_masks, skipped_files=skipped)
