"""Localisation of explanation maps against ground-truth masks (lesions, objects, known evidence).

- :func:`pointing_game` -- Zhang et al., "Top-down neural attention by excitation backprop",
  ECCV 2016 / IJCV 2018, §5.1, here without the 15-pixel tolerance.
- :func:`top_k_iou` -- MED-TEX (Nguyen-Duc et al., IEEE ISBI 2022, eq. 14): overlap of the map's K most salient pixels
  with the mask. The paper's eq. 14 is printed as ``IoU_topK = 2 |A ∩ B| / |A ∪ B|``: twice the IoU
  (range ``[0, 2]``), neither the IoU nor the Dice coefficient ``2 |A ∩ B| / (|A| + |B|)``. xkd
  drops eq. 14's factor 2 and reports both the IoU ``|A ∩ B| / |A ∪ B|`` (the name the paper
  gives, :func:`top_k_iou`) and the Dice (:func:`top_k_dice`), each under its own name; a value
  of eq. 14 as printed is ``2 * top_k_iou``.
- :func:`mask_mass` -- the share of positive attribution inside the mask: the "energy-based pointing
  game" of Wang et al., "Score-CAM", CVPR Workshops 2020, localisation evaluation (``sum_{in mask} L / sum L`` for a
  map ``L >= 0``).

Maps are ``(N, H, W)``, masks boolean ``(N, H, W)`` at the same resolution. Images whose mask is
empty have no region to find: their score is undefined, so they are skipped (``nan`` per image,
left out of the mean, never counted as 0) and counted in ``skipped_empty``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from xkd.explain.superpixel import segment_means
from xkd.metrics.agreement import top_n_mask
from xkd.metrics.base import Column, headline, metric

MEDTEX_SIDE = 224  # assumed side of MED-TEX's inputs (the paper does not state it): see medtex_k_values


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
    """MED-TEX's K in {k * 32 * 32 | k = 1..6} pixels (Fig. 2 / eq. 14), scaled to ``h x w``:
    ``K_k = round(k * 1024 * h * w / 224^2)``, kept within ``[1, h * w]``.

    The paper gives K in pixels but does not state the size of its fundus inputs. xkd **assumes
    224 x 224** (:data:`MEDTEX_SIDE`, the usual input size of ImageNet backbones) and
    keeps K the same share of the image at any size -- ``k * 1024 / 224^2``, about ``2.04 k`` % of
    the pixels -- so the paper's K values come back exactly at 224 x 224 (``K_1 = 1024``) and a
    64 x 64 image gets ``K_1 = 84`` ... ``K_6 = 502``. Under another assumed side ``s`` the shares
    would scale by ``(224 / s)^2``; pass ``k_pixels`` to the metrics to use other K."""
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


def _iou_dice(flat: Tensor, m: Tensor, k: int, tie_seed: int = 0) -> tuple[Tensor, Tensor]:
    top = top_n_mask(flat, k, tie_seed)
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
def top_k_iou(
    maps: Tensor, masks: Tensor, k_pixels: int | Sequence[int] | None = None, tie_seed: int = 0
) -> dict[str, Any]:
    """IoU (and Dice) between each map's ``K`` most salient pixels ``A`` and the mask ``B``.

    ``IoU = |A ∩ B| / |A ∪ B|``; ``Dice = 2 |A ∩ B| / (|A| + |B|)``. MED-TEX's eq. 14 prints
    ``2 |A ∩ B| / |A ∪ B|`` (twice the IoU, in ``[0, 2]``); its factor 2 is dropped. A map equal to
    its mask scores 1 on both when ``K`` is the mask's area. Ties in saliency are broken in the seeded
    random order of :mod:`xkd.metrics.ranking` (``tie_seed``).

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
        iou, dice = _iou_dice(flat, m, k, tie_seed)
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
def top_k_dice(
    maps: Tensor, masks: Tensor, k_pixels: int | Sequence[int] | None = None, tie_seed: int = 0
) -> dict[str, Any]:
    """Dice ``2 |A ∩ B| / (|A| + |B|)`` between each map's ``K`` most salient pixels ``A`` and the mask
    ``B``; the same computation as :func:`top_k_iou`, whose arguments it takes. Not MED-TEX's eq. 14,
    which prints ``2 |A ∩ B| / |A ∪ B|`` (twice the IoU, in ``[0, 2]``): xkd drops that factor 2 and
    reports the IoU and the Dice, each under its own name.

    Returns:
        ``{"top_k_dice", "top_k_iou", "k_pixels", "evaluated", "skipped_empty"}``, plus ``"per_k"``
        when several ``K`` are given.
    """
    out = top_k_iou(maps, masks, k_pixels, tie_seed)
    return {"top_k_dice": out.pop("dice"), **out}


@metric(
    "mask_mass",
    scope="model",
    # segments and map_form: a superpixel-form map is read once per superpixel (the scoring loop
    # computes segments when a selected metric declares them; pixel-form maps do not use them)
    inputs=("maps", "masks", "segments=segments", "form=map_form"),
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
def mask_mass(
    maps: Tensor, masks: Tensor, segments: Tensor | None = None, form: Literal["pixel", "superpixel"] = "pixel"
) -> dict[str, Any]:
    """Share of the positive attribution that falls inside the mask (energy-based pointing game,
    Wang et al., "Score-CAM", CVPR-W 2020, localisation evaluation)::

        mass = sum_{ij in mask} max(L_ij, 0) / sum_ij max(L_ij, 0)

    Score-CAM's maps are non-negative; signed maps (gradients, SHAP) keep their positive part, the
    evidence *for* the class. 1 when all evidence lies in the mask; a uniform map scores the mask's
    area fraction. Undefined (``nan``, left out of the mean) for an empty mask (``skipped_empty``)
    or a map without positive values (``skipped_no_positive``, e.g. an all-zero Grad-CAM).

    **Superpixel-form maps** (``form="superpixel"``: KernelSHAP, LIME, any ``<name>+superpixel``,
    where every pixel holds its superpixel's whole value) are scored once per superpixel, as the
    superpixel metrics read them (:mod:`xkd.metrics.superpixel`, ``form``): summing over pixels
    would weight each superpixel's value by its area -- two superpixels valued 1, of 10 px inside
    the mask and 90 px outside, would score 10/100 = 0.1 instead of 1/2. With superpixel ``s``'s
    value ``v_s`` (the mean of the map over ``s``, :func:`~xkd.explain.superpixel.segment_means`:
    its value when the map was made with the same ``segments``) and ``f_s = |s ∩ mask| / |s|``::

        mass = sum_s max(v_s, 0) f_s / sum_s max(v_s, 0)

    A superpixel counts as inside the mask in proportion to the share of its pixels inside
    (xkd's choice; no source defines it): the rule :func:`pointing_game` uses for tied maxima, and
    the same as any majority or all-pixels rule for a superpixel that lies wholly inside or outside
    the mask. A pixel-form map is the case of one-pixel superpixels (``f_s`` 0 or 1). The segments
    are the scoring loop's (``evaluation.superpixel``); an explainer run with other SLIC parameters
    is read through them, as the superpixel agreement metrics read it.

    Args:
        maps: ``(N, H, W)`` explanation maps.
        masks: boolean ``(N, H, W)`` ground truth.
        segments: integer superpixel labels ``(N, H, W)``; needed for ``form="superpixel"`` only.
        form: ``"pixel"`` or ``"superpixel"`` (how the explainer's maps hold their values).

    Returns:
        ``{"mask_mass", "per_image" (N,) float64 with nans, "evaluated", "skipped_empty",
        "skipped_no_positive"}``.
    """
    _flat(maps, masks)  # shape check
    if form not in ("pixel", "superpixel"):
        raise ValueError(f"form must be 'pixel' or 'superpixel', got {form!r}")
    m = masks.detach().flatten(1).bool().cpu()
    if form == "superpixel":
        if segments is None or segments.shape != maps.shape:
            got = None if segments is None else tuple(segments.shape)
            raise ValueError(
                f"superpixel-form maps need their segments (N, H, W) like the maps {tuple(maps.shape)}, got {got}"
            )
        seg = segments.detach().cpu().long()
        if seg.numel() and int(seg.min()) < 0:
            raise ValueError("segments must hold labels 0..S-1 (got negative labels)")
        pos = segment_means(maps.detach().cpu(), seg).clamp_min(0)  # (N, S_max), 0 for absent labels
        inside = segment_means(masks.detach().cpu().double(), seg)  # f_s
    else:
        pos = maps.detach().flatten(1).double().cpu().clamp_min(0)
        inside = m.double()
    total = pos.sum(dim=1)
    empty = ~m.any(dim=1)
    no_pos = ~empty & (total <= 0)
    per_image = (pos * inside).sum(dim=1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    per_image[empty | no_pos] = float("nan")
    ok = ~(empty | no_pos)
    return {
        "mask_mass": float(per_image[ok].mean()) if ok.any() else float("nan"),
        "per_image": per_image,
        "evaluated": int(ok.sum()),
        "skipped_empty": int(empty.sum()),
        "skipped_no_positive": int(no_pos.sum()),
    }


def check_fraction(fraction: float) -> None:
    """The share of pixels of :func:`region_precision_recall`, checked."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")


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
    check=check_fraction,
)
def region_precision_recall(maps: Tensor, masks: Tensor, fraction: float = 0.1, tie_seed: int = 0) -> dict[str, Any]:
    """Precision and recall of each map's top ``fraction`` of pixels against the known discriminative
    region (the synthetic ground-truth experiment of Han et al., ICML 2023).

    With ``A`` the ``max(1, round(fraction * H * W))`` most salient pixels and ``B`` the mask:
    precision ``|A ∩ B| / |A|`` (how much of what the map points at is evidence), recall
    ``|A ∩ B| / |B|`` (how much of the evidence it finds), averaged over images with a non-empty mask.

    Returns:
        ``{"region_precision", "region_recall", "fraction", "evaluated", "skipped_empty"}``.
    """
    check_fraction(fraction)
    flat, m, valid = _flat(maps, masks)
    n = int(valid.sum())
    nan = float("nan")
    if n == 0:
        return {"region_precision": nan, "region_recall": nan, "fraction": fraction, "evaluated": 0,
                "skipped_empty": int((~valid).sum())}  # fmt: skip
    top = top_n_mask(flat, max(1, round(fraction * flat.shape[1])), tie_seed)
    inter = (top & m).sum(dim=1).double()
    return {
        "region_precision": float((inter / top.sum(dim=1)).mean()),
        "region_recall": float((inter / m.sum(dim=1)).mean()),
        "fraction": fraction,
        "evaluated": n,
        "skipped_empty": int((~valid).sum()),
    }
