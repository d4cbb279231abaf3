"""Teacher-student explanation agreement: how similar are two models' maps of the same images?

Maps ``a`` and ``b`` are ``(N, H, W)`` (same images, same order, e.g. teacher and student Grad-CAM).
Every score is computed per image on the flattened maps and then averaged over images.

An image whose map is constant in ``a`` or ``b`` (e.g. an all-zero Grad-CAM after the ReLU) has no
defined correlation: it scores ``nan`` and is left out of the mean (``nanmean``), rather than being
counted as 0, which would confuse "no explanation" with "unrelated explanation". The mean is ``nan``
only if every image is constant; ``reduction="none"`` returns the per-image scores with the nans.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from xkd.metrics.base import metric
from xkd.metrics.ranking import average_ranks, saliency_order


def _flat_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"maps must both be (N, H, W) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.detach().flatten(1).double().cpu(), b.detach().flatten(1).double().cpu()


def _reduce(scores: Tensor, reduction: str) -> float | Tensor:
    if reduction == "none":
        return scores
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return float(scores.nanmean()) if len(scores) else float("nan")


def row_pearson(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Pearson correlation of each row pair of ``x`` and ``y`` ``(N, P)``, and whether it is defined
    (neither row constant; the test is exact, on the raw values: centring a constant row can leave
    rounding noise). Undefined rows hold a meaningless finite value."""
    defined = (x.amax(dim=1) > x.amin(dim=1)) & (y.amax(dim=1) > y.amin(dim=1))
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    den = x.norm(dim=1) * y.norm(dim=1)
    return (x * y).sum(dim=1) / torch.where(defined, den, torch.ones_like(den)), defined


def _pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    if x.shape[1] == 0:
        return torch.full((x.shape[0],), float("nan"), dtype=torch.float64)
    r, defined = row_pearson(x, y)
    return torch.where(defined, r.clamp(-1.0, 1.0), torch.full_like(r, float("nan")))


@metric(
    "map_pearson",
    scope="agreement",
    inputs=("teacher_maps", "student_maps"),
    higher_is_better=True,
    category="agreement",
    label="Pearson",
    description="Pearson correlation with the teacher's maps",
    default=True,
)
def map_pearson(a: Tensor, b: Tensor, reduction: Literal["mean", "none"] = "mean") -> float | Tensor:
    """Pearson correlation of the two maps of each image (flattened), averaged over images.

    Constant maps give ``nan`` for that image, excluded from the mean (see the module docstring).
    """
    return _reduce(_pearson_rows(*_flat_pair(a, b)), reduction)


@metric(
    "rank_correlation",
    scope="agreement",
    inputs=("teacher_maps", "student_maps"),
    higher_is_better=True,
    category="agreement",
    label="Rank corr.",
    description="Spearman rank correlation with the teacher's maps",
    default=True,
)
def map_spearman(a: Tensor, b: Tensor, reduction: Literal["mean", "none"] = "mean") -> float | Tensor:
    """Spearman rank correlation of the two maps of each image, averaged over images: the Pearson
    correlation of the pixel ranks, ties given their average rank (as ``scipy.stats.spearmanr``).
    Registered as ``rank_correlation``.

    Constant maps give ``nan`` for that image, excluded from the mean (see the module docstring).
    """
    x, y = _flat_pair(a, b)
    return _reduce(_pearson_rows(average_ranks(x), average_ranks(y)), reduction)


def top_n_mask(flat: Tensor, n: int, seed: int = 0) -> Tensor:
    """Boolean ``(N, P)`` mask of the ``n`` largest values of each row of ``flat`` ``(N, P)``; ties
    are broken in the seeded random order of :mod:`xkd.metrics.ranking` (``seed``)."""
    order = saliency_order(flat.detach(), seed)[:, :n]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)


def top_k_mask(maps: Tensor, k: float, seed: int = 0) -> Tensor:
    """Boolean ``(N, H*W)`` mask of each map's ``max(1, round(k * H * W))`` largest pixels (ties in
    the seeded random order of :mod:`xkd.metrics.ranking`)."""
    flat = maps.detach().flatten(1)
    return top_n_mask(flat, max(1, round(k * flat.shape[1])), seed)


@metric(
    "top_k_agreement",
    scope="agreement",
    inputs=("teacher_maps", "student_maps", "k=agreement_top_k"),
    higher_is_better=True,
    category="agreement",
    label="Top-k% IoU",
    description="IoU of the top pixels shared with the teacher",
    default=True,
)
def top_k_iou_maps(
    a: Tensor, b: Tensor, k: float = 0.1, reduction: Literal["mean", "none"] = "mean", tie_seed: int = 0
) -> float | Tensor:
    """IoU of the top-``k`` fraction of pixels of the two maps of each image, averaged over images.

    1 when both maps single out the same pixels, 0 when their top sets are disjoint. A top set is
    the ``max(1, round(k * H * W))`` largest pixels of the map **above its minimum**: pixels at the
    minimum (the zeros of a Grad-CAM after the ReLU) carry no evidence and are never taken, so a
    sparse map has a smaller top set (it is not padded with arbitrary zero pixels, which would make
    two empty maps agree perfectly). An image whose map is constant in ``a`` or ``b`` has no top
    set: it scores ``nan`` and is left out of the mean, as for the correlations. Ties above the
    minimum are broken in the seeded random order of :mod:`xkd.metrics.ranking` (``tie_seed``).
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    fa, fb = _flat_pair(a, b)
    n = max(1, round(k * fa.shape[1]))
    ta = top_n_mask(fa, n, tie_seed) & (fa > fa.amin(dim=1, keepdim=True))
    tb = top_n_mask(fb, n, tie_seed) & (fb > fb.amin(dim=1, keepdim=True))
    union = (ta | tb).sum(dim=1).double()
    iou = (ta & tb).sum(dim=1).double() / union
    iou[~ta.any(dim=1) | ~tb.any(dim=1)] = float("nan")
    return _reduce(iou.cpu(), reduction)
