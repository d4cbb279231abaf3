"""Is the teacher's explanation closer to the distilled student's than to an independent student's?

Ojha, Li, Sundara Rajan, Liang & Lee, "What Knowledge Gets Distilled in Knowledge Distillation?"
(NeurIPS 2023), §4.1 "Does localization knowledge get distilled?": a teacher, a distilled student and
an *independent* student (the student's architecture trained without the teacher) each explain the
ground-truth class of 5,000 random ImageNet validation images with Grad-CAM; the score is the share
of images on which the teacher's map is more similar (cosine similarity) to the distilled student's
map than to the independent student's. Chance is 50%: the paper's sanity check, two independent
students trained with different seeds, scores about 50%. Fig. 2 (right) reports, for ResNet50 →
ResNet18, 67.2% for KL (Hinton KD), 55.6% for CRD and 52.9% for Hint against 50.3% for the
independent pair (VGG19 → VGG11: 59.2%, 67.6%, 52.9% and 50.2%), each averaged over two runs.

xkd computes it for every explainer of the run (maps of the true class, as the paper), with

- ``distance="cosine"`` (default, the paper's) or ``"rank"``: the Spearman correlation of the two
  maps' pixel ranks (ties given their average rank, as ``scipy.stats.spearmanr``), which ignores
  each map's scale;
- ties (the two similarities exactly equal, e.g. identical maps of the two students) counted as half
  an image closer and half farther, so a student indistinguishable from the independent one scores
  exactly 50%; the paper does not say how it counts ties (with continuous maps they are rare);
- images where a similarity is undefined (a map that is all zero, e.g. a Grad-CAM after its ReLU,
  for the cosine; a constant map for the rank correlation) left out and counted as ``undefined``,
  never scored as a tie or a loss (as the agreement metrics of :mod:`xkd.metrics.agreement`);
- a two-sided binomial test of the share against 50% (``scipy.stats.binomtest``): the sign test on
  the untied images (closer vs farther), ties carrying no evidence either way. The paper reports no
  test. ``p_value`` is 1 when every image is a tie.

The comparison runs on the maps' device, vectorised over images, without host synchronisation
(:func:`closer_counts`); the four counts are read back once per call.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from scipy.stats import binomtest
from torch import Tensor

from xkd.metrics.agreement import row_pearson
from xkd.metrics.base import Column, metric
from xkd.metrics.ranking import average_ranks

Distance = Literal["cosine", "rank"]

SENTENCE = (
    "the teacher's {explainer} is closer to this student's than to an independent student's ({independent}) "
    "on {share} of {images} images ({p})"
)


def _rows(maps: Tensor) -> Tensor:
    # float64 where the device has it: the two similarities are compared exactly (ties)
    dtype = torch.float32 if maps.device.type == "mps" else torch.float64
    return maps.detach().flatten(1).to(dtype)


def _cosine(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    na, nb = a.norm(dim=1), b.norm(dim=1)
    defined = (na > 0) & (nb > 0)
    return (a * b).sum(dim=1) / torch.where(defined, na * nb, torch.ones_like(na)), defined


def similarity(a: Tensor, b: Tensor, distance: Distance = "cosine") -> tuple[Tensor, Tensor]:
    """Per-image similarity of maps ``a`` and ``b`` ``(N, H, W)``, and whether it is defined:
    the cosine similarity of the flattened maps, or (``"rank"``) their Spearman correlation."""
    if distance == "cosine":
        return _cosine(_rows(a), _rows(b))
    if distance == "rank":  # NaN has no rank (scipy's spearmanr gives NaN); inf does
        ra, rb = _rows(a), _rows(b)
        sim, defined = row_pearson(average_ranks(ra), average_ranks(rb))
        return sim, defined & ~ra.isnan().any(dim=1) & ~rb.isnan().any(dim=1)
    raise ValueError(f"distance must be 'cosine' or 'rank', got {distance!r}")


def closer_counts(teacher: Tensor, student: Tensor, independent: Tensor, distance: Distance = "cosine") -> Tensor:
    """``(closer, ties, farther, undefined)`` image counts, a tensor on the maps' device (no host sync):
    images where the teacher's map is more similar to ``student``'s than to ``independent``'s,
    equally similar, less similar, and where either similarity is undefined."""
    shapes = {tuple(teacher.shape), tuple(student.shape), tuple(independent.shape)}
    if len(shapes) != 1 or teacher.ndim != 3:
        raise ValueError(f"maps must all be (N, H, W) of one shape, got {sorted(shapes)}")
    to_student, ok_s = similarity(teacher, student, distance)
    to_independent, ok_i = similarity(teacher, independent, distance)
    # a map with inf or NaN gives a NaN similarity, which no comparison counts: undefined, not lost
    defined = ok_s & ok_i & to_student.isfinite() & to_independent.isfinite()
    return torch.stack(
        [
            (defined & (to_student > to_independent)).sum(),
            (defined & (to_student == to_independent)).sum(),
            (defined & (to_student < to_independent)).sum(),
            (~defined).sum(),
        ]
    )


def closer_record(closer: int, ties: int, farther: int, undefined: int) -> dict[str, Any]:
    """The share (ties counted half), the number of images and the two-sided binomial (sign) test
    against 50% of the counts; share and p-value are None when no image is defined."""
    images = closer + ties + farther
    untied = closer + farther
    return {
        "share": (closer + ties / 2) / images if images else None,
        "images": images,
        "closer": closer,
        "ties": ties,
        "farther": farther,
        "undefined": undefined,
        "p_value": float(binomtest(closer, untied, 0.5).pvalue) if untied else (1.0 if images else None),
    }


@metric(
    "closer_to_teacher",
    scope="agreement",
    inputs=("teacher_maps", "student_maps", "independent_maps", "independent=independent_role"),
    higher_is_better=True,
    category="agreement",
    label="Closer to teacher",
    description="share of images where the teacher's map is closer to this student's than to an independent "
    "student's (chance 50%)",
    default=True,
    record=lambda r: {"closer_to_teacher": r},
    columns=(
        Column(
            "closer_to_teacher",
            "Closer to teacher",
            "share of images where the teacher's map is closer to this student's than to an independent student's "
            "(ties half; chance 50%, Ojha et al. 2023)",
            "share",
        ),
    ),
    sentence=SENTENCE,
)
def closer_to_teacher(
    teacher_maps: Tensor,
    student_maps: Tensor,
    independent_maps: Tensor,
    distance: Distance = "cosine",
    independent: str | None = None,
) -> dict[str, Any]:
    """Share of images whose teacher map is closer to ``student_maps`` than to ``independent_maps``
    (Ojha et al., NeurIPS 2023, §4.1 and Fig. 2; see the module docstring), with its counts and the
    binomial test against 50%. ``independent`` names the independent student (recorded; the scoring
    loop passes that student's maps). Registered as ``closer_to_teacher``."""
    counts = closer_counts(teacher_maps, student_maps, independent_maps, distance)
    closer, ties, farther, undefined = (int(v) for v in counts.tolist())  # the one read-back
    return {**closer_record(closer, ties, farther, undefined), "distance": distance, "independent": independent}
