"""``concepts``: a generated RGB dataset with pixel masks of every visual concept, for network dissection.

Broden (Bau et al., "Network Dissection", CVPR 2017), the data set of Han et al. (ICML 2023), cannot
be downloaded here, so xkd generates a small offline stand-in with the same kind
of labels: every pixel carries up to one concept of each of four categories.

========  ===============================================  ========================================
category  concepts                                         mask
========  ===============================================  ========================================
object    circle, square, triangle, cross, star            the object's silhouette (class = shape)
part      outline, centre                                  a 2 px rim of the object (drawn black or
                                                           white) / a dot at its centre
texture   stripes, dots, checker                           the object's textured surface (the
                                                           interior: silhouette minus its parts)
colour    red, green, blue, yellow, cyan, magenta,         the pixels painted in that colour or its
          orange, white, black                             dark shade (object, parts, distractor blobs)
========  ===============================================  ========================================

Each image shows one object (random position and size, at most 28-38 px across at 64 px, turned
up to 20 degrees from upright) on a cluttered grey background (smooth low-frequency noise, pixel
noise and ``num_distractors`` small blobs of palette colours kept clear of the object). The object
is filled with one chromatic colour; with probability 3/4 it carries a texture (stripes, dots or
checker, equally likely) whose pattern is painted in a dark shade of that colour (half its RGB
value: a texture changes the luminance, not the hue, so the silhouette stays one colour);
independently, with probability 1/2 each, it has an outline (white or black) and a centre dot (any
palette colour but the fill's). Everything but the silhouette is drawn independently of the class,
so the class is the object's shape only. Masks are exact: they are the generator's own labels
(pixels are not anti-aliased), not thresholds of the image; the background grey is in no colour
concept.

Learnability (why upright shapes and same-hue textures): the 3-block student of
``configs/study_kd_vs_ls.yaml`` (``kdfmv_cnn`` 16-32-64 with batch norm; Adam, lr 2e-3, batch 32,
1400 training images) reached 42 / 65 / 76 % test accuracy after 2 / 4 / 6 epochs (chance 20 %);
with shapes at any rotation it reached only 31-40 % after 2-5 epochs (32-34 % after 2-4 with
patterns in a second, arbitrary palette colour).

Items follow the data contract of every dataset (``(image, label, mask)``, ``mask`` = the object's
silhouette, so localisation metrics work as on ``lesions``). The splits are :class:`ConceptDataset`
objects that add :attr:`~ConceptDataset.concept_names`, :attr:`~ConceptDataset.concept_categories`
and :meth:`~ConceptDataset.concept_masks` (``(K, H, W)`` bool). Concept labels are stored as one
uint8 label map per category (the concepts of a category never overlap), 4 bytes per pixel.

Generation is vectorised (numpy, chunks of 512 images) and deterministic from the seed: 2000 images
of 64x64 take about 2 s (measured 1.7-2.3 s on a shared 2-core machine under a load of ~3) and
hold 65 MB (images 25 MB, label maps 33 MB, object masks 8 MB).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xkd.config import DataConfig
from xkd.data.base import DataBundle, DataError, TensorImageDataset, stratified_split
from xkd.data.builtin import SPLIT_70_20_10, check_int, check_params, finish_bundle, resize_images
from xkd.registry import DATASETS

CONCEPT_CLASSES = ["circle", "square", "triangle", "cross", "star"]
PARTS = ["outline", "centre"]
TEXTURES = ["stripes", "dots", "checker"]
PALETTE = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.12, 0.66, 0.16),
    "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.86, 0.10),
    "cyan": (0.10, 0.80, 0.85),
    "magenta": (0.85, 0.15, 0.80),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
    "black": (0.04, 0.04, 0.04),
}
COLOURS = list(PALETTE)
CATEGORIES = ("object", "part", "texture", "colour")
_BY_CATEGORY = {"object": CONCEPT_CLASSES, "part": PARTS, "texture": TEXTURES, "colour": COLOURS}
CONCEPT_NAMES = [c for cat in CATEGORIES for c in _BY_CATEGORY[cat]]
CONCEPT_CATEGORIES = {c: cat for cat in CATEGORIES for c in _BY_CATEGORY[cat]}
# concept k is label value _VALUE[k] of the label map _GROUP[k] (0 = no concept of that category)
_GROUP = torch.tensor([CATEGORIES.index(CONCEPT_CATEGORIES[c]) for c in CONCEPT_NAMES])
_VALUE = torch.tensor([_BY_CATEGORY[CONCEPT_CATEGORIES[c]].index(c) + 1 for c in CONCEPT_NAMES], dtype=torch.uint8)

DEFAULTS = {"num_per_class": 400, "size": None, "noise": 0.03, "num_distractors": 3}
_CHUNK = 512
_CHROMATIC = 7  # the first 7 palette colours fill objects; white and black only paint parts and blobs
SHADE = 0.5  # texture patterns are painted in the fill colour times this
_CANDIDATES = 32  # positions tried per distractor; the first clear of the object is used


class ConceptDataset(TensorImageDataset):
    """A split of ``concepts``: ``(image, label, object_mask)`` items plus every concept's mask.

    Attributes:
        concept_names: the K concept names, in the order of :meth:`concept_masks`.
        concept_categories: concept name -> category (``object``, ``part``, ``texture``, ``colour``).
        concept_maps: uint8 ``(N, 4, H, W)``, one label map per category (0: none, v: its v-th concept).
    """

    def __init__(self, images: Tensor, labels: Tensor, concept_maps: Tensor) -> None:
        if concept_maps.shape != (images.shape[0], len(CATEGORIES), *images.shape[2:]):
            raise DataError(
                f"concept_maps must have shape {(images.shape[0], len(CATEGORIES), *images.shape[2:])}, "
                f"got {tuple(concept_maps.shape)}"
            )
        super().__init__(images, labels, concept_maps[:, 0] > 0)
        self.concept_maps = concept_maps
        self.concept_names = list(CONCEPT_NAMES)
        self.concept_categories = dict(CONCEPT_CATEGORIES)

    def concept_masks(self, i: int) -> Tensor:
        """Boolean ``(K, H, W)`` masks of item ``i``, one per concept of :attr:`concept_names`."""
        return self.concept_maps[i][_GROUP] == _VALUE[:, None, None]

    def concept_masks_batch(self, index: Tensor | Sequence[int]) -> Tensor:
        """Boolean ``(B, K, H, W)`` masks of the items ``index`` (vectorised :meth:`concept_masks`)."""
        maps = self.concept_maps[torch.as_tensor(index, dtype=torch.long)]
        return maps[:, _GROUP] == _VALUE[None, :, None, None]

    def subset(self, index: Tensor) -> ConceptDataset:
        return ConceptDataset(self.images[index], self.labels[index], self.concept_maps[index])

    def resized(self, size: int) -> ConceptDataset:
        """The same items at ``size`` x ``size`` (images bilinear, antialiased; label maps nearest)."""
        maps = F.interpolate(self.concept_maps.float(), size=(size, size), mode="nearest").to(torch.uint8)
        return ConceptDataset(resize_images(self.images, size), self.labels, maps)


# ----------------------------------------------------------------------------------------------
# generation


def _sample(rng: np.random.Generator, labels: np.ndarray, size: int, num_distractors: int) -> dict[str, np.ndarray]:
    """Every random choice of ``len(labels)`` images (no pixels yet), so rendering can be chunked."""
    n, k = len(labels), size / 64.0  # lengths are given for 64 px images and scale with the image
    p: dict[str, np.ndarray] = {
        "label": labels,
        "cx": rng.uniform(0.32, 0.68, n) * size,
        "cy": rng.uniform(0.32, 0.68, n) * size,
        "radius": rng.uniform(0.22, 0.30, n) * size,  # every shape lies within this circle
        "theta": rng.uniform(-np.pi / 9, np.pi / 9, n),  # upright +-20 degrees
        "fill": rng.integers(0, _CHROMATIC, n),
        "texture": rng.integers(0, len(TEXTURES) + 1, n),  # 0: plain
        "outline": rng.random(n) < 0.5,
        "outline_colour": np.where(rng.random(n) < 0.5, COLOURS.index("white"), COLOURS.index("black")),
        "centre": rng.random(n) < 0.5,
        "period": rng.uniform(5.0, 7.0, n) * k,
        "beta": rng.uniform(0, np.pi, n),
        "phase_u": rng.random(n),
        "phase_v": rng.random(n),
        "grey": rng.uniform(0.35, 0.60, n),
        "smooth": (0.07 * rng.normal(0, 1, (n, 1, 6, 6)) + 0.03 * rng.normal(0, 1, (n, 3, 6, 6))).astype(np.float32),
    }
    # the centre dot's colour differs from the fill colour (any other palette colour)
    p["centre_colour"] = (p["fill"] + rng.integers(1, len(COLOURS), n)) % len(COLOURS)
    m = num_distractors
    dr = rng.uniform(1.5, 3.5, (n, m)) * k
    cand_x, cand_y = rng.uniform(0, size, (2, n, m, _CANDIDATES))
    clear = np.hypot(cand_x - p["cx"][:, None, None], cand_y - p["cy"][:, None, None])
    ok = clear > (p["radius"][:, None] + dr + 2.0 * k)[..., None]
    first = ok.argmax(-1)[..., None]
    p["d_x"] = np.take_along_axis(cand_x, first, -1)[..., 0]
    p["d_y"] = np.take_along_axis(cand_y, first, -1)[..., 0]
    p["d_r"] = np.where(ok.any(-1), dr, 0.0)  # no clear position (rare): leave the blob out
    p["d_colour"] = rng.integers(0, len(COLOURS), (n, m))
    return p


def _silhouettes(u: np.ndarray, v: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Boolean silhouettes in object coordinates (``u, v`` in units of the radius), by class."""
    r = np.hypot(u, v)
    circle = r <= 0.8
    square = np.maximum(np.abs(u), np.abs(v)) <= 0.7  # corners at 0.99: inside the unit circle
    triangle = np.ones_like(circle)
    for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6):  # equilateral, circumradius 1, inradius 0.5
        triangle &= u * np.cos(a) + v * np.sin(a) <= 0.5
    cross = ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    # five-pointed star: tips at radius 1, inner corners at 0.45, straight edges (polar line equation)
    alpha, inner = np.pi / 5, 0.45
    psi = np.mod(np.arctan2(v, u), 2 * alpha)
    psi = np.minimum(psi, 2 * alpha - psi)  # angle to the nearest tip
    edge = inner * np.sin(alpha) / (np.sin(psi) + inner * np.sin(alpha - psi))
    star = r <= edge
    return np.select([label == i for i in range(4)], [circle, square, triangle, cross], star)


def _render(p: dict[str, np.ndarray], sl: slice, size: int, noise: float, rng: np.random.Generator) -> tuple:
    """uint8 images ``(n, 3, S, S)`` and uint8 concept label maps ``(n, 4, S, S)`` of chunk ``sl``."""

    def col(key: str) -> np.ndarray:
        return p[key][sl][:, None, None].astype(np.float32)

    def idx(key: str, offset: int = 0) -> np.ndarray:  # small per-image integers as uint8 (n, 1, 1)
        return (p[key][sl][:, None, None] + offset).astype(np.uint8)

    k = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    xx, yy = xx[None], yy[None]
    palette = np.asarray(list(PALETTE.values()), np.float32)
    colour = np.zeros((len(p["label"][sl]), size, size), np.uint8)  # palette index + 1; 0: background
    for j in range(p["d_r"].shape[1]):
        blob = np.hypot(xx - p["d_x"][sl, j, None, None], yy - p["d_y"][sl, j, None, None])
        paint = (p["d_colour"][sl, j, None, None] + 1).astype(np.uint8)
        colour = np.where(blob <= p["d_r"][sl, j, None, None], paint, colour)
    du, dv = xx - col("cx"), yy - col("cy")
    c, s, radius = np.cos(col("theta")), np.sin(col("theta")), col("radius")
    u, v = (du * c + dv * s) / radius, (-du * s + dv * c) / radius
    sil = _silhouettes(u, v, idx("label"))
    # outline: silhouette pixels within 2 px (scaled) of a pixel outside it
    w = max(1, round(2 * k))
    disc = torch.from_numpy((np.hypot(*np.mgrid[-w : w + 1, -w : w + 1]) <= w + 0.01).astype(np.float32))
    outside = torch.from_numpy((~sil).astype(np.float32))[:, None]
    near = F.conv2d(outside, disc[None, None], padding=w)[:, 0].numpy() > 0.5
    rim = sil & near & p["outline"][sl][:, None, None]
    dot = sil & ~rim & (np.hypot(u, v) <= 0.2) & p["centre"][sl][:, None, None]
    interior = sil & ~rim & ~dot
    # texture pattern in texture coordinates (rotated by beta, random phase)
    cb, sb, period = np.cos(col("beta")), np.sin(col("beta")), col("period")
    tu = (xx * cb + yy * sb) / period + col("phase_u")
    tv = (-xx * sb + yy * cb) / period + col("phase_v")
    fu, fv = tu - np.floor(tu), tv - np.floor(tv)
    stripes = fu < 0.5
    dots = np.hypot(fu - 0.5, fv - 0.5) <= 0.3
    checker = (np.floor(2 * tu) + np.floor(2 * tv)) % 2 == 0
    tex = idx("texture")
    pattern = np.select([tex == 1, tex == 2, tex == 3], [stripes, dots, checker], False)
    colour = np.where(interior, idx("fill", 1), colour)
    colour = np.where(rim, idx("outline_colour", 1), colour)
    colour = np.where(dot, idx("centre_colour", 1), colour)
    # background: grey level + smooth noise (slightly tinted); then palette colours; then pixel noise
    smooth = torch.from_numpy(p["smooth"][sl])
    smooth = F.interpolate(smooth, size=(size, size), mode="bicubic", align_corners=True).numpy()
    rgb = col("grey")[:, None] + smooth
    painted = palette[np.maximum(colour, 1) - 1].transpose(0, 3, 1, 2)  # (n, 3, S, S)
    painted = np.where((interior & pattern)[:, None], painted * np.float32(SHADE), painted)
    rgb = np.where(colour[:, None] > 0, painted, rgb)
    if noise > 0:
        rgb += noise * rng.standard_normal(rgb.shape, dtype=np.float32)
    zero = np.uint8(0)
    parts = rim.view(np.uint8) + 2 * dot.view(np.uint8)
    maps = np.stack([np.where(sil, idx("label", 1), zero), parts, np.where(interior, tex, zero), colour], axis=1)
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8), maps


def generate_concepts(
    num_per_class: int = 400, size: int = 64, seed: int = 0, noise: float = 0.03, num_distractors: int = 3
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Generate the concept images, deterministically from ``seed``.

    Args:
        num_per_class: images per class (5 classes, see :data:`CONCEPT_CLASSES`).
        size: image side in pixels (all lengths scale with it).
        seed: seed of every random choice; the same seed gives identical tensors.
        noise: standard deviation of the Gaussian pixel noise (images are in [0, 1]).
        num_distractors: small palette-coloured blobs per image, kept clear of the object.

    Returns:
        ``(images, labels, masks, concept_maps)``: uint8 ``(N, 3, size, size)``; int64 ``(N,)`` in
        shuffled class order; bool ``(N, size, size)`` object silhouettes; uint8
        ``(N, 4, size, size)`` label maps of the categories ``object, part, texture, colour`` (value
        ``v`` = the category's ``v``-th concept, 0 = none). ``N = 5 * num_per_class``.
    """
    check_int(num_per_class, "num_per_class", 1)
    check_int(size, "size", 16)
    check_int(num_distractors, "num_distractors", 0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise <= 0.5:
        raise DataError(f"noise must be a number in [0, 0.5], got {noise!r}; set data.params.noise to such a value")
    rng = np.random.default_rng(seed)
    n = len(CONCEPT_CLASSES) * num_per_class
    labels = rng.permutation(np.repeat(np.arange(len(CONCEPT_CLASSES)), num_per_class))
    params = _sample(rng, labels, size, num_distractors)
    images = np.empty((n, 3, size, size), np.uint8)
    maps = np.empty((n, len(CATEGORIES), size, size), np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        images[sl], maps[sl] = _render(params, sl, size, float(noise), rng)
    maps_t = torch.from_numpy(maps)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), maps_t[:, 0] > 0, maps_t


@DATASETS.register("concepts")
def concepts(cfg: DataConfig) -> DataBundle:
    """The generated concept dataset (5 shape classes; object, part, texture and colour masks), split
    70/20/10 stratified. Its splits are :class:`ConceptDataset` objects (for network dissection).

    Params: ``num_per_class`` (400, so 2000 images), ``size`` (generation size; default
    ``data.image_size`` or 64), ``noise`` (0.03), ``num_distractors`` (3). The data and the split
    both follow ``data.seed``.
    """
    p = check_params(cfg, DEFAULTS)
    size = p["size"] if p["size"] is not None else (cfg.image_size or 64)
    check_int(p["num_per_class"], "data.params.num_per_class", 1)
    check_int(size, "data.params.size", 16)
    check_int(p["num_distractors"], "data.params.num_distractors", 0)
    images, labels, _, maps = generate_concepts(p["num_per_class"], size, cfg.seed, p["noise"], p["num_distractors"])
    full = ConceptDataset(images, labels, maps)
    if cfg.image_size is not None and cfg.image_size != size:
        full = full.resized(check_int(cfg.image_size, "data.image_size", 1))
    train, val, test = (full.subset(idx) for idx in stratified_split(full.labels, SPLIT_70_20_10, cfg.seed))
    # the size is final: finish_bundle's own resizing would rebuild plain TensorImageDatasets
    return finish_bundle(dataclasses.replace(cfg, image_size=None), train, val, test, CONCEPT_CLASSES, has_masks=True)
