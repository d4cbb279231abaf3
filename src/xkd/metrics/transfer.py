"""Knowledge-transfer metrics of UniCAM (Adhane et al., "On Explaining Knowledge Distillation:
Measuring and Visualising the Knowledge Transfer Process", 2024): FSS and RS, on (partial) distance correlation.

The statistics (U-centred distance matrices, bias-corrected and partial distance correlation) are in
:mod:`xkd.stats`, shared with the UniCAM explainer (:mod:`xkd.explain.unicam`).

**FSS is R* (bias-corrected dCor^2, U-statistic), not the V-statistic dCor.** The squared form is the
paper's definition (the bias correction is xkd's choice). Why: (1) it is the statistic of the
partial-correlation framework used for RS and UniCAM, so FSS and RS are on one scale; (2) it is
unbiased: independent features give ~0 at any dimension, whereas the V-statistic dCor of independent
4096-dim features is far from 0 at small n (measured: n=64 independent Gaussian 4096-dim features,
V-statistic dCor = 0.998, R* = 0.005; n=256: 0.992 vs -0.0001), so a V-statistic FSS would mostly
measure the dimension. R* can be slightly negative for independent features. :func:`xkd.stats.dcor_v`
(= ``dcor.distance_correlation``) is kept for reference.

**Batch size.** FSS and RS are statistics over a *sample of images*, not per-image scores: compute the
features of all N images first (:func:`pair_features`, in batches of ``batch_size`` that only bound memory),
then one N x N statistic. N up to ~1000 is cheap (a few 8 MB matrices).

**Targets of RS.** The authors correlate features with CLIP text embeddings of the class names, loaded
from a model hub; that is not possible offline, so xkd uses a class-semantic target built from the labels:
``"onehot"`` (one-hot label vectors: distance 0 within a class, sqrt(2) across classes) or
``"class_mean"`` (each image is represented by the mean feature vector of its class, by default the
second model's features). Both only encode "same class / which classes are close", not the language
semantics of CLIP, so RS values are not comparable to the paper's numbers; ``class_mean`` built from the
teacher's features favours the teacher (its own features define the target).

Speed of the statistics against ``dcor``: see :mod:`xkd.stats`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from xkd.metrics.base import headline, metric
from xkd.models.hooks import capture_features, default_layer, get_module
from xkd.models.state import eval_mode, model_device
from xkd.stats import Target, check_same_samples, class_target, dcor_u, u_centered_distances, u_correlation, u_residual


@metric(
    "fss",
    scope="transfer",
    inputs=("student_features", "teacher_features"),
    higher_is_better=True,
    category="transfer",
    label="FSS",
    description="Feature similarity score: bias-corrected dCor^2 of student and teacher features (UniCAM)",
    default=True,
)
def fss(student_feats: Tensor, teacher_feats: Tensor) -> float:
    """Feature similarity score (UniCAM): ``R*(student, teacher)``, the bias-corrected squared distance
    correlation of the two models' features of the same N images (see the module docstring for why
    dCor^2 and not dCor). 1 = the same geometry up to rotation, translation and scale; ~0 = independent.

    Args:
        student_feats, teacher_feats: ``(N, ...)`` features of the same images at matched layers
            (e.g. from :func:`pair_features`), N >= 4.
    """
    with torch.no_grad():
        return float(dcor_u(student_feats, teacher_feats))


@metric(
    "rs",
    scope="transfer",
    inputs=("student_features", "teacher_features", "labels", "num_classes=num_classes"),
    higher_is_better=True,
    category="transfer",
    label="RS",
    description="Relevance score: dCor^2 of the student's features beyond the teacher with a class target",
    default=True,
    record=lambda r: {"rs": {k: headline(v) for k, v in r.items()}},
)
def rs(
    student_feats: Tensor,
    teacher_feats: Tensor,
    labels: Tensor,
    target: Target = "onehot",
    num_classes: int | None = None,
    target_feats: Tensor | None = None,
) -> dict[str, Any]:
    """Relevance score (UniCAM): distance correlation of features with a class-semantic target.

    The headline ``rs`` is ``R*(P_teacher(student), target)``: how task-relevant the part of the first
    model's features that the second model does not explain is. With a KD student and its base model
    (same architecture trained without KD) as the second model this is the paper's comparison "RS between
    Student and Base model": what KD added, and whether it is relevant. The second model may equally be
    the teacher.

    Args:
        student_feats, teacher_feats: ``(N, ...)`` features of the same images (first and second model).
        labels: class indices ``(N,)``.
        target: ``"onehot"`` or ``"class_mean"`` (see :func:`xkd.stats.class_target`; offline stand-ins for the
            authors' CLIP text embeddings).
        num_classes: one-hot width (does not change the value).
        target_feats: features averaged per class for ``"class_mean"`` (default ``teacher_feats``).

    Returns:
        ``{"rs": headline, "rs_student", "rs_teacher": R*(raw features, target),
        "rs_student_given_teacher" (= rs), "rs_teacher_given_student": R*(P_student(teacher), target),
        "pdcor_student_target_given_teacher": R*(student, target; teacher) (both projected),
        "fss": R*(student, teacher), "target", "n"}``.
    """
    check_same_samples(student_feats, teacher_feats, labels)
    y = class_target(labels, target, num_classes, teacher_feats if target_feats is None else target_feats)
    with torch.no_grad():
        a, b, t = u_centered_distances(student_feats), u_centered_distances(teacher_feats), u_centered_distances(y)
        given = float(u_correlation(u_residual(a, b), t))
        return {
            "rs": given,
            "rs_student": float(u_correlation(a, t)),
            "rs_teacher": float(u_correlation(b, t)),
            "rs_student_given_teacher": given,
            "rs_teacher_given_student": float(u_correlation(u_residual(b, a), t)),
            "pdcor_student_target_given_teacher": float(u_correlation(u_residual(a, b), u_residual(t, b))),
            "fss": float(u_correlation(a, b)),
            "target": target,
            "n": int(student_feats.shape[0]),
        }


def _batches(data: Tensor | Iterable[Any], batch_size: int) -> Iterable[tuple[Tensor, Tensor | None]]:
    if isinstance(data, Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size], None
        return
    for item in data:
        if isinstance(item, Tensor):
            yield item, None
        elif hasattr(item, "images") and hasattr(item, "labels"):  # xkd.data.base.Batch
            yield item.images, item.labels
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
            yield item[0], item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
        else:
            raise TypeError(
                "data must be an image tensor (N, C, H, W) or an iterable of image tensors, (images, labels) "
                f"tuples or Batch objects; got an item of type {type(item).__name__}"
            )


def model_features(
    model: nn.Module, data: Tensor | Iterable[Any], layer: str | None = None, batch_size: int = 64
) -> tuple[Tensor, Tensor | None]:
    """Flattened float32 features ``(N, D)`` (on the CPU) of ``model``'s module ``layer`` (default: its
    default layer) for all images of ``data``, and the labels if ``data`` yields them.

    ``data`` is an image tensor (processed in chunks of ``batch_size``) or an iterable of batches (image
    tensors, ``(images, labels, ...)`` tuples or :class:`xkd.data.base.Batch`). Eval mode, no autograd.
    """
    layer = default_layer(model) if layer is None else layer
    get_module(model, layer)  # unknown layer -> LayerNotFoundError listing candidates
    feats, labels = [], []
    device = model_device(model, torch.device("cpu"))
    with eval_mode(model), torch.no_grad():
        with capture_features(model, [layer], detach=True, reduce=lambda _p, o: o.flatten(1).float().cpu()) as got:
            for images, lab in _batches(data, batch_size):
                got.clear()
                model(images.to(device))
                if layer not in got:
                    raise RuntimeError(f"layer {layer!r} was not called in the forward pass of {type(model).__name__}")
                feats.append(got[layer])
                labels.append(lab)
    if not feats:
        raise ValueError("data yielded no images")
    have = [x is not None for x in labels]
    return torch.cat(feats), torch.cat([x.cpu() for x in labels]) if all(have) else None


@dataclass
class PairFeatures:
    """Features of the same N images from two models (flattened float32, CPU) and where they came from."""

    student: Tensor
    teacher: Tensor
    labels: Tensor | None
    student_layer: str
    teacher_layer: str


def pair_features(
    student: nn.Module,
    teacher: nn.Module,
    data: Tensor | Iterable[Any],
    student_layer: str | None = None,
    teacher_layer: str | None = None,
    batch_size: int = 64,
) -> PairFeatures:
    """Features of the same images from two models at matched layers (default: each model's default
    layer), see :func:`model_features`. Pass a re-iterable ``data`` (a tensor, list or DataLoader without
    shuffling): it is read once per model."""
    s_layer = default_layer(student) if student_layer is None else student_layer
    t_layer = default_layer(teacher) if teacher_layer is None else teacher_layer
    s, labels = model_features(student, data, s_layer, batch_size)
    t, _ = model_features(teacher, data, t_layer, batch_size)
    check_same_samples(s, t)
    return PairFeatures(s, t, labels, s_layer, t_layer)


def transfer_scores(
    student: nn.Module,
    teacher: nn.Module,
    images: Tensor | Iterable[Any],
    labels: Tensor | None = None,
    student_layer: str | None = None,
    teacher_layer: str | None = None,
    target: Target = "onehot",
    batch_size: int = 64,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """FSS and RS of a (student, teacher) pair on a set of images, in one call.

    Returns:
        ``{"fss": float, "rs": {rs(...) dict}, "student_layer", "teacher_layer", "n"}``; ``rs`` is None when
        no labels are given or found in ``images``.
    """
    f = pair_features(student, teacher, images, student_layer, teacher_layer, batch_size)
    labels = f.labels if labels is None else labels.cpu()
    out: dict[str, Any] = {"fss": fss(f.student, f.teacher), "n": f.student.shape[0]}
    out.update(student_layer=f.student_layer, teacher_layer=f.teacher_layer)
    out["rs"] = None if labels is None else rs(f.student, f.teacher, labels, target, num_classes)
    return out
