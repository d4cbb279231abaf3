"""Localisation of explanation maps against ground-truth masks (lesions, objects, known evidence).

- :func:`pointing_game` -- Zhang et al., "Top-down neural attention by excitation backprop",
  ECCV 2016 / IJCV 2018, §5.1, here without the 15-pixel tolerance.
- :func:`top_k_iou` -- MED-TEX (Nguyen-Duc et al., IEEE ISBI 2022, eq. 14): overlap of the map's K most salient pixels
  with the mask. The paper's eq. 14, ``2|A ∩ B| / (|A| + |B|)``, is the Dice coefficient, not IoU;
  both are reported under their right names; :func:`top_k_dice` registers the Dice on its own.
- :func:`mask_mass` -- the share of positive attribution inside the mask: the "energy-based pointing
  game" of Wang et al., "Score-CAM", CVPR Workshops 2020, localisation evaluation (``sum_{in mask} L / sum L`` for a
  map ``L >= 0``).

Maps are ``(N, H, W)``, masks boolean ``(N, H, W)`` at the same resolution. Images whose mask is
empty have no region to find: their score is undefined, so they are skipped (``nan`` per image,
left out of the mean, never counted as 0) and counted in ``skipped_empty``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from xkd.metrics.agreement import top_n_mask
from xkd.metrics.base import Column, headline, metric

MEDTEX_SIDE = 224


def _flat(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (N, H, W) of the same shape; "
            "explanation maps are at input resolution, so resize the masks to the images' size (nearest)"
        )
    m = masks.detach().flatten(1).bool().cpu()
    valid = m.any(dim=1)
    return maps.detach().flatten(1).cpu()[valid], m[valid], valid


def medtex_k_values(h: int, w: int) -> list[int]:
    """MED-TEX's K in {k * 32 * 32 | k = 1..6} pixels, scaled from its 224x224 inputs to ``h x w``:
    ``K_k = round(k * 1024 * h * w / 224^2)``, kept within ``[1, h * w]``."""
    return [min(h * w, max(1, round(k * 1024 * h * w / (MEDTEX_SIDE * MEDTEX_SIDE)))) for k in range(1, 7)]


def _per_k(result: dict[str, Any]) -> dict[str, Any]:
    """Top-K IoU and Dice per K, keyed by K as text (the record's ``top_k``)."""
    return {str(k): v for k, v in (result.get("per_k") or {}).items()}


@metric(
    "pointing_game",
    scope="model",
    inputs=("maps", "masks"),
    higher_is_better=True,
    category="localisation",
    label="Pointing game",
    description="map maximum inside the mask",
    default=True,
)
def pointing_game(maps: Tensor, masks: Tensor) -> dict[str, Any]:
    """Pointing game: the fraction of images whose map maximum lies inside the mask.

    Strict: no tolerance margin around the mask (Zhang et al. allow 15 px at ImageNet size; small
    images have no room for one). If several pixels share the maximum -- every pixel of the top
    superpixel of a KernelSHAP/LIME map, a flat plateau, a constant map -- the image scores the
    share of them inside the mask (the expected hit of pointing at one of them at random): picking
    the first in row-major order instead scored superpixel maps 0 on small lesions, and a constant
    map scores the mask's area share, as chance does.

    Returns:
        ``{"pointing_game": hits / evaluated, "hits" (fractional with ties), "evaluated", "skipped_empty"}``.
    """
    flat, m, valid = _flat(maps, masks)
    tied = flat == flat.amax(dim=1, keepdim=True)
    share = (tied & m).sum(dim=1).double() / tied.sum(dim=1).clamp_min(1).double()
    hits = float(share.sum())
    n = int(valid.sum())
    return {
        "pointing_game": hits / n if n else float("nan"),
        "hits": hits,
        "evaluated": n,
        "skipped_empty": int((~valid).sum()),
    }


def _iou_dice(flat: Tensor, m: Tensor, k: int) -> tuple[Tensor, Tensor]:
    top = top_n_mask(flat, k)
    inter = (top & m).sum(dim=1).double()
    iou = inter / (top | m).sum(dim=1).double()
    dice = 2 * inter / (top.sum(dim=1) + m.sum(dim=1)).double()
    return iou, dice


@metric(
    "top_k_iou",
    scope="model",
    inputs=("maps", "masks", "k_values"),
    higher_is_better=True,
    category="localisation",
    label="Top-K IoU",
    description="mean over MED-TEX's K values",
    default=True,
    record=lambda r: {"top_k_iou": headline(r, "top_k_iou"), "top_k": _per_k(r)},
)
def top_k_iou(maps: Tensor, masks: Tensor, k_pixels: int | Sequence[int] | None = None) -> dict[str, Any]:
    """IoU (and Dice) between each map's ``K`` most salient pixels ``A`` and the mask ``B``.

    ``IoU = |A ∩ B| / |A ∪ B|``; ``Dice = 2 |A ∩ B| / (|A| + |B|)`` (MED-TEX eq. 14). A map equal to
    its mask scores 1 on both when ``K`` is the mask's area. Ties in saliency are broken by pixel
    index.

    Args:
        maps: ``(N, H, W)`` explanation maps.
        masks: boolean ``(N, H, W)`` ground truth.
        k_pixels: ``K``; a list of ``K`` values gives one score per ``K`` (averaged for the headline
            value); None uses :func:`medtex_k_values` for the image size.

    Returns:
        ``{"top_k_iou", "dice", "k_pixels", "evaluated", "skipped_empty"}``, plus ``"per_k":
        {K: {"iou", "dice"}}`` when several ``K`` are given.
    """
    flat, m, valid = _flat(maps, masks)
    h, w = maps.shape[1:]
    ks = medtex_k_values(h, w) if k_pixels is None else k_pixels
    ks_list = [int(k) for k in ks] if isinstance(ks, Sequence) else [int(ks)]
    if not ks_list or any(not 1 <= k <= h * w for k in ks_list):
        raise ValueError(f"k_pixels must lie in 1..{h * w}, got {ks}")
    per_k = {}
    for k in ks_list:
        iou, dice = _iou_dice(flat, m, k)
        nan = float("nan")
        per_k[k] = {"iou": float(iou.mean()) if len(iou) else nan, "dice": float(dice.mean()) if len(dice) else nan}
    out: dict[str, Any] = {
        "top_k_iou": float(torch.tensor([v["iou"] for v in per_k.values()]).mean()),
        "dice": float(torch.tensor([v["dice"] for v in per_k.values()]).mean()),
        "k_pixels": ks_list if len(ks_list) > 1 else ks_list[0],
        "evaluated": int(valid.sum()),
        "skipped_empty": int((~valid).sum()),
    }
    if len(ks_list) > 1:
        out["per_k"] = per_k
    return out


@metric(
    "top_k_dice",
    scope="model",
    inputs=("maps", "masks", "k_values"),
    higher_is_better=True,
    category="localisation",
    label="Top-K Dice",
    description="mean over MED-TEX's K values",
    default=True,
    record=lambda r: {"top_k_dice": headline(r, "top_k_dice"), "top_k": _per_k(r)},
)
def top_k_dice(maps: Tensor, masks: Tensor, k_pixels: int | Sequence[int] | None = None) -> dict[str, Any]:
    """Dice ``2 |A ∩ B| / (|A| + |B|)`` between each map's ``K`` most salient pixels ``A`` and the mask
    ``B`` (MED-TEX eq. 14 as written); the same computation as :func:`top_k_iou`, whose arguments it takes.

    Returns:
        ``{"top_k_dice", "top_k_iou", "k_pixels", "evaluated", "skipped_empty"}``, plus ``"per_k"``
        when several ``K`` are given.
    """
    out = top_k_iou(maps, masks, k_pixels)
    return {"top_k_dice": out.pop("dice"), **out}


@metric(
    "mask_mass",
    scope="model",
    inputs=("maps", "masks"),
    higher_is_better=True,
    category="localisation",
    label="Mask mass",
    description="share of positive attribution inside the mask",
    default=True,
    record=lambda r: {
        "mask_mass": headline(r, "mask_mass"),
        "undefined": {"no_positive_attribution": r["skipped_no_positive"]},
    },
)
def mask_mass(maps: Tensor, masks: Tensor) -> dict[str, Any]:
    """Share of the positive attribution that falls inside the mask (energy-based pointing game,
    Wang et al., "Score-CAM", CVPR-W 2020, localisation evaluation)::

        mass = sum_{ij in mask} max(L_ij, 0) / sum_ij max(L_ij, 0)

    Score-CAM's maps are non-negative; signed maps (gradients, SHAP) keep their positive part, the
    evidence *for* the class. 1 when all evidence lies in the mask; a uniform map scores the mask's
    area fraction. Undefined (``nan``, left out of the mean) for an empty mask (``skipped_empty``)
    or a map without positive values (``skipped_no_positive``, e.g. an all-zero Grad-CAM).

    Returns:
        ``{"mask_mass", "per_image" (N,) float64 with nans, "evaluated", "skipped_empty",
        "skipped_no_positive"}``.
    """
    _flat(maps, masks)  # shape check
    pos = maps.detach().flatten(1).double().cpu().clamp_min(0)
    m = masks.detach().flatten(1).bool().cpu()
    total = pos.sum(dim=1)
    empty = ~m.any(dim=1)
    no_pos = ~empty & (total <= 0)
    per_image = (pos * m).sum(dim=1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    per_image[empty | no_pos] = float("nan")
    ok = ~(empty | no_pos)
    return {
        "mask_mass": float(per_image[ok].mean()) if ok.any() else float("nan"),
        "per_image": per_image,
        "evaluated": int(ok.sum()),
        "skipped_empty": int(empty.sum()),
        "skipped_no_positive": int(no_pos.sum()),
    }


@metric(
    "region_precision",
    scope="model",
    inputs=("maps", "masks"),
    higher_is_better=True,
    category="localisation",
    label="Region precision",
    record=lambda r: {"region_precision": r["region_precision"], "region_recall": r["region_recall"]},
    columns=(
        Column("region_precision", "Region precision", "share of the top pixels inside the evidence region"),
        Column("region_recall", "Region recall", "share of the evidence region among the top pixels"),
    ),
)
def region_precision_recall(maps: Tensor, masks: Tensor, fraction: float = 0.1) -> dict[str, Any]:
    """Precision and recall of each map's top ``fraction`` of pixels against the known discriminative
    region (the synthetic ground-truth experiment of Han et al., ICML 2023).

    With ``A`` the ``max(1, round(fraction * H * W))`` most salient pixels and ``B`` the mask:
    precision ``|A ∩ B| / |A|`` (how much of what the map points at is evidence), recall
    ``|A ∩ B| / |B|`` (how much of the evidence it finds), averaged over images with a non-empty mask.

    Returns:
        ``{"region_precision", "region_recall", "fraction", "evaluated", "skipped_empty"}``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat, m, valid = _flat(maps, masks)
    n = int(valid.sum())
    nan = float("nan")
    if n == 0:
        return {"region_precision": nan, "region_recall": nan, "fraction": fraction, "evaluated": 0,
                "skipped_empty": int((~valid).sum())}  # fmt: skip
    top = top_n_mask(flat, max(1, round(fraction * flat.shape[1])))
    inter = (top & m).sum(dim=1).double()
    return {
        "region_precision": float((inter / top.sum(dim=1)).mean()),
        "region_recall": float((inter / m.sum(dim=1)).mean()),
        "fraction": fraction,
        "evaluated": n,
        "skipped_empty": int((~valid).sum()),
    }
