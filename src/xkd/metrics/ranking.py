"""Pixel ranking shared by the perturbation metrics (:mod:`xkd.metrics.faithfulness`, :mod:`xkd.metrics.road`).

Pixels are ranked by decreasing saliency; equal saliency is broken by pixel index (row-major, the
lower index first), so results are deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor


def saliency_ranks(maps: Tensor) -> Tensor:
    """Rank ``(N, H*W)`` of every pixel in decreasing saliency (0 = most salient; ties by index)."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def check_maps(images: Tensor, maps: Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is ``(N, C, H, W)`` and ``maps`` is ``(N, H, W)``."""
    if images.ndim != 4 or maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"maps {tuple(maps.shape)} must be (N, H, W) for images {tuple(images.shape)}")


__all__ = ["check_maps", "saliency_ranks"]
