"""XDistillation's explanation-consistency metrics (Alharbi, Vu & Thai, "Learning Interpretation with Explainable Knowledge Distillation", IEEE
BigData 2021, §IV-B "Explanation consistency").

Teacher and student maps ``a`` and ``b`` ``(N, H, W)`` of the same images are turned into superpixel
explanations with one shared segmentation ``segments`` ``(N, H, W)`` (integer labels per image,
e.g. :func:`xkd.explain.superpixel.slic_segments`): every superpixel gets the **sum** of its
attribution (:func:`xkd.explain.superpixel.segment_sums`, the paper's §III-A1 transform, which it
also applies to Grad-CAM before comparing). Then:

- :func:`superpixel_mse` -- Table IV: "the mean square error (MSE) to measure the similarity between
  the two explanations".
- :func:`superpixel_sign_agreement` -- Table V: over the inputs both models classify correctly, "the
  k most important super-pixels of the corresponding explanations" and ``h = 1 where sign(M) =
  sign(T)``, reported as a percentage.

Images can be restricted with a boolean ``correct`` ``(N,)`` (e.g. both models right, as the paper
does for Table V and "the same predictions" for Table IV); an empty selection gives ``nan`` and the
counts say why.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from xkd.explain.superpixel import segment_means, segment_sums
from xkd.metrics.base import Column, headline, metric
from xkd.metrics.ranking import saliency_order

Form = Literal["pixel", "superpixel"]


def _superpixel_values(a: Tensor, b: Tensor, segments: Tensor, form: Form = "pixel") -> tuple[Tensor, Tensor, Tensor]:
    """``(N, S_max)`` values of ``a`` and ``b`` per superpixel and the ``(N, S_max)`` mask of real superpixels.

    ``form="pixel"``: the maps are pixel attributions and a superpixel's value is their **sum** (the
    paper's transform). ``form="superpixel"``: the maps are already in superpixel form -- every pixel
    holds its superpixel's value (KernelSHAP, LIME, any ``<name>+superpixel``) -- and the value is the
    **mean** over the superpixel, which is that value when the map was made with the same segmentation
    (summing it again would weight each superpixel by its area)."""
    if form not in ("pixel", "superpixel"):
        raise ValueError(f"form must be 'pixel' or 'superpixel', got {form!r}")
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"maps must both be (N, H, W) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if segments.shape != a.shape:
        raise ValueError(
            f"segments {tuple(segments.shape)} must be (N, H, W) like the maps {tuple(a.shape)}: "
            "one segmentation per image at the maps' resolution"
        )
    if segments.dtype.is_floating_point or segments.dtype == torch.bool:
        raise ValueError(f"segments must hold integer superpixel labels, got {segments.dtype}")
    seg = segments.detach().cpu().long()
    if seg.numel() and int(seg.min()) < 0:
        raise ValueError("segments must hold labels 0..S-1 (got negative labels)")
    values = segment_sums if form == "pixel" else segment_means
    sa, sb = values(a.detach().cpu(), seg), values(b.detach().cpu(), seg)
    # labels present in each image (robust to gaps in the labels and to padding up to S_max)
    real = torch.zeros(sa.shape, dtype=torch.bool).scatter_(1, seg.flatten(1), True)
    return sa, sb, real


def _selection(correct: Tensor | None, n: int) -> Tensor:
    if correct is None:
        return torch.ones(n, dtype=torch.bool)
    sel = torch.as_tensor(correct).detach().cpu()
    if sel.shape != (n,) or sel.dtype != torch.bool:
        raise ValueError(
            f"correct must be a boolean tensor of shape ({n},) (True where both models are right), "
            f"got {sel.dtype} {tuple(sel.shape)}"
        )
    return sel


@metric(
    "superpixel_mse",
    scope="agreement",
    inputs=("teacher_maps", "student_maps", "segments", "correct=same_prediction", "form=map_form"),
    higher_is_better=False,
    category="agreement",
    label="SP MSE",
    description="superpixel values vs the teacher's, on images both assign the same class",
    default=True,
    record=lambda r: {
        "superpixel_mse": r["superpixel_mse"],
        "superpixel_mse_all_images": r["all_images"],
        "superpixel_mse_images": r["evaluated"],
    },
    columns=(
        Column("superpixel_mse", "SP MSE", "superpixel values vs the teacher's, images both assign the same class"),
        Column("superpixel_mse_all_images", "SP MSE (all images)", "the same over every explained image"),
    ),
    # each image's superpixel vector scaled by its largest |value| (signs kept): teacher and student
    # maps of most explainers live on different scales (metric_params normalize: false for raw)
    kwargs={"normalize": True},
)
def superpixel_mse(
    a: Tensor,
    b: Tensor,
    segments: Tensor,
    normalize: bool = False,
    correct: Tensor | None = None,
    form: Form = "pixel",
) -> dict[str, Any]:
    """MSE between the teacher's and the student's superpixel explanations (XDistillation, Table IV).

    Per image ``i`` with ``S_i`` superpixels (the labels present) and superpixel sums ``A_s``, ``B_s``::

        mse_i = 1 / S_i * sum_s (A_s - B_s)^2,      superpixel_mse = mean over the selected images

    ``normalize=False`` (default) compares the raw sums, as the paper does for SHAP: SHAP values of
    both models are in the same unit (they add up to the model output minus its expectation), so
    their difference is meaningful. Maps without a common scale -- Grad-CAM magnitudes follow each
    model's activations -- should use ``normalize=True``: each image's superpixel vector is divided
    by its largest ``|value|`` (the sign, which :func:`superpixel_sign_agreement` reads, is kept;
    min-max scaling would move the zero). A vector of zeros stays zero. ``form="superpixel"`` for
    maps already in superpixel form (see :func:`_superpixel_values`).

    ``correct`` selects the images averaged: XDistillation's Table IV uses only the inputs where
    teacher and student predict the same class (a run passes that selection); ``all_images`` is the
    mean over every image, reported beside it.

    Returns:
        ``{"superpixel_mse", "all_images", "per_image" (N,) float64 (nan for unselected images),
        "evaluated", "skipped"}``.
    """
    sa, sb, real = _superpixel_values(a, b, segments, form)
    sel = _selection(correct, a.shape[0])
    if normalize:
        sa = sa / sa.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        sb = sb / sb.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    per_image = ((sa - sb) ** 2 * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)
    all_images = float(per_image.mean()) if len(per_image) else float("nan")
    per_image[~sel] = float("nan")
    return {
        "superpixel_mse": float(per_image[sel].mean()) if sel.any() else float("nan"),
        "all_images": all_images,
        "per_image": per_image,
        "evaluated": int(sel.sum()),
        "skipped": int((~sel).sum()),
    }


def _top_k(values: Tensor, real: Tensor, k: int, tie_seed: int = 0) -> Tensor:
    """Boolean mask of each row's ``k`` largest ``|values|`` among its real, non-zero superpixels
    (equal values in the seeded random order of :mod:`xkd.metrics.ranking`, not by index): a
    superpixel with no attribution is not important, so a sparse row has fewer."""
    live = real & (values != 0)
    score = values.abs().masked_fill(~live, -1.0)  # padded and zero entries rank last
    order = saliency_order(score, tie_seed)[:, :k]
    top = torch.zeros_like(real).scatter_(1, order, True)
    return top & live


def check_sign_params(k: int, select: str) -> None:
    """:func:`superpixel_sign_agreement`'s ``k`` and ``select``, checked."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if select not in ("each", "teacher"):
        raise ValueError(f"select must be 'each' or 'teacher', got {select!r}")


@metric(
    "superpixel_sign_agreement",
    scope="agreement",
    inputs=("teacher_maps", "student_maps", "segments", "correct=both_correct", "form=map_form"),
    higher_is_better=True,
    category="agreement",
    label="SP sign agr.",
    description="top superpixels' signs",
    default=True,
    record=lambda r: {
        "superpixel_sign_agreement": headline(r, "superpixel_sign_agreement"),
        "sign_agreement_images": headline(r.get("evaluated")),
    },
    check=check_sign_params,
)
def superpixel_sign_agreement(
    a: Tensor,
    b: Tensor,
    segments: Tensor,
    k: int = 2,
    correct: Tensor | None = None,
    select: Literal["each", "teacher"] = "each",
    form: Form = "pixel",
) -> dict[str, Any]:
    """Top-k superpixel sign agreement of teacher ``a`` and student ``b`` (XDistillation, Table V).

    The paper: "for all correctly classified inputs by both teacher and student models, we collect the
    k most important super-pixels of the corresponding explanations and compute ... h(x) = 1 where
    sign(M(x)) = sign(T(x)), 0 otherwise, where M(x) [T(x)] is the explanation value of overlapping
    SLIC super-pixels patch" of the student [teacher], introduced as "measuring the overlapping area
    of explained super-pixels". The literal reading, ``select="each"`` (default): each model's own
    ``k`` most important superpixels (largest ``|value|``: importance of a signed explanation is its
    magnitude, as LIME and SHAP rank features), and ``h = 1`` for a superpixel in **both** top sets
    whose signs match::

        score_i = |{s in top_k(T) ∩ top_k(M) : sign(T_s) = sign(M_s)}| / max(|top_k(T)|, |top_k(M)|)

    so it is 1 only when both models single out the same superpixels with the same signs.
    ``select="teacher"`` is the looser reading: the teacher's top ``k`` superpixels and the share whose
    student sign matches (divided by ``|top_k(T)|``). ``k`` defaults to 2, the paper's Fig. 11.
    ``sign(0) = 0``: a zero matches only a zero, but a zero superpixel is never among the important
    ones, so a top set holds at most ``k`` of the non-zero superpixels: a sparse map has fewer, and
    two identical maps score 1 however sparse. An image where either model's superpixel values are
    all zero has no important superpixel and is **undefined** (``nan``, counted in ``undefined``,
    left out of the mean) -- two empty explanations do not "agree". Superpixels of equal importance
    are taken in the seeded random order of :mod:`xkd.metrics.ranking` (seed 0), not by label.

    Args:
        a, b: teacher and student maps ``(N, H, W)``.
        segments: shared superpixel labels ``(N, H, W)``.
        k: number of superpixels.
        correct: boolean ``(N,)``, True where both models classify the image correctly (None: all
            images; the caller decides).
        select: ``"each"`` or ``"teacher"`` (see above).
        form: ``"pixel"`` (sum per superpixel) or ``"superpixel"`` for maps already in superpixel
            form (mean per superpixel; see :func:`_superpixel_values`).

    Returns:
        ``{"superpixel_sign_agreement": mean over the selected images (nan when none qualifies),
        "per_image" (N,) float64 with nans, "evaluated" (images scored), "skipped" (not selected),
        "undefined" (selected, but no important superpixel in one of the maps), "k"}``.
    """
    check_sign_params(k, select)
    sa, sb, real = _superpixel_values(a, b, segments, form)
    sel = _selection(correct, a.shape[0])
    same_sign = torch.sign(sa) == torch.sign(sb)
    top_t, top_s = _top_k(sa, real, k), _top_k(sb, real, k)
    chosen = top_t & top_s if select == "each" else top_t
    # the important superpixels there are (an identical sparse pair used to score below 1)
    size = torch.maximum(top_t.sum(dim=1), top_s.sum(dim=1)) if select == "each" else top_t.sum(dim=1)
    per_image = (chosen & same_sign).sum(dim=1).double() / size.clamp_min(1)
    undefined = sel & (~top_t.any(dim=1) | ~top_s.any(dim=1))
    per_image[~sel | undefined] = float("nan")
    scored = sel & ~undefined
    return {
        "superpixel_sign_agreement": float(per_image[scored].mean()) if scored.any() else float("nan"),
        "per_image": per_image,
        "evaluated": int(scored.sum()),
        "skipped": int((~sel).sum()),
        "undefined": int(undefined.sum()),
        "k": k,
    }
