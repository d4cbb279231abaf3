"""Pixel ranking shared by every metric that orders pixels by saliency: the perturbation metrics
(:mod:`xkd.metrics.faithfulness`, :mod:`xkd.metrics.road`), the top-``n`` masks of
:mod:`xkd.metrics.agreement` and :mod:`xkd.metrics.localisation`, and DiffROAR
(:mod:`xkd.studies.diffroar`).

Pixels are ranked by decreasing saliency. **Equal saliency is broken in a seeded random order**:
one random permutation of the ``P`` pixel positions, ``torch.randperm(P)`` drawn from
``torch.Generator().manual_seed(seed)``, orders the pixels of equal value (lexicographic order on
(value, position in the permutation); the values themselves are never perturbed). Maps without
ties rank exactly as by value alone; the same ``seed`` gives the same result; the permutation
depends only on ``P`` and ``seed``, the same for every image of a call, so results do not depend on
how images are batched. ``seed`` defaults to 0 (metric functions take it as ``tie_seed``).

Why not the pixel index: ties are common -- a Grad-CAM after its ReLU is exactly 0 over large
regions -- and breaking them by row-major index makes "least salient" mean "the top rows of the
image". ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution
Methods", ICML 2022, §3) exists to keep the *shape* of the removal mask from carrying class
information, and an index tie-break turns its LeRF mask into a horizontal band. DiffROAR (Shah,
Jain & Netrapalli, "Do Input Gradients Highlight Discriminative Features?", NeurIPS 2021) takes its
keep-top and keep-bottom sets from the two ends of one ordering (their code's
``get_attribution_indices``: one ``np.argsort`` of ``|attribution|``, flipped for the top), which
leaves the order among ties to the sort; a seeded random order is that choice made reproducible,
and the two ends of one total order never share a pixel (they would share the tied band if each
side broke its ties by index).
"""

from __future__ import annotations

import torch
from torch import Tensor


def tie_permutation(p: int, seed: int = 0) -> Tensor:
    """The seeded tie-break order of ``p`` positions: ``torch.randperm(p)`` from
    ``torch.Generator().manual_seed(seed)`` (CPU, int64)."""
    return torch.randperm(p, generator=torch.Generator().manual_seed(int(seed)))


def saliency_order(flat: Tensor, seed: int = 0, perm: Tensor | None = None) -> Tensor:
    """Indices ``(N, P)`` that sort each row of ``flat`` ``(N, P)`` by decreasing value, equal values
    in the seeded random order of :func:`tie_permutation` (see the module docstring).

    ``perm``: ``tie_permutation(P, seed)`` already on ``flat``'s device, for callers that rank chunk
    after chunk (drawing it on the CPU and copying it over each time blocks the host); None draws it.
    """
    if perm is None:
        perm = tie_permutation(flat.shape[1], seed).to(flat.device)
    # a stable sort of the permuted rows keeps equal values in permutation order: the lexicographic
    # order on (value, position in the permutation), without touching the values
    order = torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices
    return perm[order]


def saliency_ranks(maps: Tensor, seed: int = 0, perm: Tensor | None = None) -> Tensor:
    """Rank ``(N, H*W)`` of every pixel in decreasing saliency (0 = most salient); ties in the seeded
    random order of ``seed`` (see the module docstring). ``perm`` as in :func:`saliency_order`."""
    flat = maps.flatten(1)
    order = saliency_order(flat, seed, perm)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def check_maps(images: Tensor, maps: Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is ``(N, C, H, W)`` and ``maps`` is ``(N, H, W)``."""
    if images.ndim != 4 or maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"maps {tuple(maps.shape)} must be (N, H, W) for images {tuple(images.shape)}")


__all__ = ["check_maps", "saliency_order", "saliency_ranks", "tie_permutation"]


def average_ranks(x: Tensor) -> Tensor:
    """Ranks ``1..P`` of every row of ``x`` ``(N, P)``, tied values given their average rank (as
    ``scipy.stats.rankdata(method="average", axis=1)``), computed on ``x``'s device (rankdata would
    copy every map to the host): the Spearman correlations of ``rank_correlation`` and of
    ``closer_to_teacher``'s rank distance."""
    n, p = x.shape
    s, order = x.sort(dim=1)
    pos = torch.arange(p, device=x.device).expand(n, p)
    start = torch.ones_like(s, dtype=torch.bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    end = torch.ones_like(start)
    end[:, :-1] = start[:, 1:]
    first = torch.where(start, pos, 0).cummax(dim=1).values  # where each value's run of ties starts
    last = torch.where(end, pos, p - 1).flip(1).cummin(dim=1).values.flip(1)  # and where it ends
    avg = (first + last).to(x.dtype) / 2 + 1
    return torch.empty_like(avg).scatter_(1, order, avg)
