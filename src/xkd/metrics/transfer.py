"""Knowledge-transfer metrics of UniCAM (Adhane et al., "On Explaining Knowledge Distillation:
Measuring and Visualising the Knowledge Transfer Process", 2024): FSS and RS, on (partial) distance correlation.

The statistics are in :mod:`xkd.stats`, shared with the UniCAM explainer (:mod:`xkd.explain.unicam`).
Each quantity follows the authors' code, gadhane/UniCAM ``rsfss_common.py`` as run by ``main_RSFSS_raw.py``
(raw features, no CAM; the script their README names for quantification):

* ``fss`` (default) **is the authors' FSS**: ``pdCor.Distance_Correlation(teacher, student)`` =
  the squared V-statistic distance correlation of the *row-L2-normalised* features,
  ``Γ_XY / sqrt(Γ_XX Γ_YY)`` with double-centred distance matrices (:func:`xkd.stats.dcor_v_sqr` with
  ``normalize=True``). Invariant to rotating the features and to rescaling each image's feature vector,
  not to translating them. **Biased upwards**: independent features score far above 0, the more the
  larger their dimension is relative to the number of images (measured, independent Gaussian features:
  n = 64, 16 dims: 0.48; n = 64, 4096 dims: 0.996; n = 256, 4096 dims: 0.985), so compare FSS values
  only at equal n and layer.
* ``fss_unbiased`` (xkd's variant, not on by default, not the authors' FSS): ``R*``, the bias-corrected
  (U-centred) squared distance correlation of the raw features (:func:`xkd.stats.dcor_u`): ~0 for
  independent features at any dimension (the same cases: -0.017, 0.044, 0.002), and on the scale of RS.
  It is xkd's FSS before this followed the authors, kept for that reason.
* ``rs``: the authors' RS family, all U-centred ``R*`` on raw features with a class target (see
  :func:`rs` for which key is which of their report's sections).

**Batch size.** FSS and RS are statistics over a *sample of images*, not per-image scores: compute the
features of all N images first (:func:`pair_features`, in batches of ``batch_size`` that only bound memory),
then one N x N statistic. N up to ~1000 is cheap (a few 8 MB matrices). The authors do the same over the
images of their processed batches (``main_RSFSS_raw.py``: 10 shuffled test batches of 5, each with at least
2 classes and 2 images per class, i.e. N = 50); xkd uses every scored test image.

**Deviations from the authors' RS/FSS** (besides the numerical guards listed in :mod:`xkd.stats`):

* Target: the authors correlate features with CLIP ViT-B/32 image-feature class prototypes of the
  training split (earlier, BERT embeddings of the class names), loaded from a model hub; that is not
  possible offline, so xkd's class target is an offline stand-in built from the labels
  (:func:`xkd.stats.class_target`): ``"onehot"`` (default; for two classes it gives exactly the
  statistic of any class prototypes) or ``"class_mean"`` (the authors' prototype recipe on a model's
  own features, by default the second model's, which it favours). With more than two classes RS values
  are therefore not comparable with the paper's numbers.
* Layers: the authors report four depths of a ResNet (the outputs of ``layer1`` to ``layer4``, flattened);
  xkd reports one matched pair of layers (``evaluation.transfer_layers``, default each model's explained
  layer). Their per-model "progression" section (each layer against the last one of the same model) is
  not computed: their README calls it not a transfer metric.
* Models: the authors compare the teacher with each student and the students pairwise (e.g. the KD
  student against its base model, the same architecture trained without KD); the transfer scope here
  compares each student with the teacher. :func:`rs` takes any pair of models.

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
from xkd.stats import (
    MIN_SAMPLES,
    Target,
    check_same_samples,
    class_target,
    dcor_u,
    dcor_v_sqr,
    u_centered_distances,
    u_correlation,
    u_residual,
)


@metric(
    "fss",
    scope="transfer",
    inputs=("student_features", "teacher_features"),
    higher_is_better=True,
    category="transfer",
    label="FSS",
    description="Feature similarity score as the UniCAM authors compute it: V-statistic dCor^2 of the "
    "row-L2-normalised student and teacher features (biased upwards; fss_unbiased is xkd's R* variant)",
    default=True,
    min_images=MIN_SAMPLES,
)
def fss(student_feats: Tensor, teacher_feats: Tensor) -> float:
    """Feature similarity score, the UniCAM authors' definition (gadhane/UniCAM ``pdCor.Distance_Correlation``,
    reported as "teacher vs student" by ``rsfss_common.compute_similarity_metrics``).

    Each image's flattened features are scaled to unit L2 norm; with the double-centred distance matrices
    ``A`` (student) and ``B`` (teacher) and ``Γ(A, B) = mean(A * B)``, FSS = ``Γ(A, B) / sqrt(Γ(A, A) Γ(B, B))``,
    the squared V-statistic distance correlation (Székely, Rizzo & Bakirov 2007). In [0, 1]; 1 = the same
    geometry up to rotation and per-image scale. Biased upwards (independent high-dimensional features
    score near 1: see the module docstring); :func:`fss_unbiased` is xkd's bias-corrected variant.

    Args:
        student_feats, teacher_feats: ``(N, ...)`` features of the same images at matched layers
            (e.g. from :func:`pair_features`), N >= 4.
    """
    with torch.no_grad():
        return float(dcor_v_sqr(student_feats, teacher_feats, normalize=True))


@metric(
    "fss_unbiased",
    scope="transfer",
    inputs=("student_features", "teacher_features"),
    higher_is_better=True,
    category="transfer",
    label="FSS (R*)",
    description="xkd's variant of FSS, not the authors': bias-corrected dCor^2 (R*, U-centred) of the raw "
    "student and teacher features (~0 when independent)",
    min_images=MIN_SAMPLES,
)
def fss_unbiased(student_feats: Tensor, teacher_feats: Tensor) -> float:
    """xkd's bias-corrected variant of FSS (**not** the authors' FSS, which is :func:`fss`): ``R*(student,
    teacher)``, the bias-corrected squared distance correlation (U-centred, Székely & Rizzo 2014) of the raw
    (not normalised) features of the same N images. ~0 for independent features at any dimension (can be
    slightly negative), 1 = the same geometry up to rotation, translation and scale; on the scale of RS.

    Args:
        student_feats, teacher_feats: ``(N, ...)`` features of the same images at matched layers, N >= 4.
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
    description="Relevance score as the UniCAM authors compute it (P_DC): R* of the class target with the "
    "student's features, the teacher's projected out (raw features; class target: offline stand-in for CLIP)",
    default=True,
    record=lambda r: {"rs": {k: headline(v) for k, v in r.items()}},
    min_images=MIN_SAMPLES,
)
def rs(
    student_feats: Tensor,
    teacher_feats: Tensor,
    labels: Tensor,
    target: Target = "onehot",
    num_classes: int | None = None,
    target_feats: Tensor | None = None,
) -> dict[str, Any]:
    """Relevance score (UniCAM): distance correlation of features with a class-semantic target, the
    authors' statistics (gadhane/UniCAM ``rsfss_common.py``) on raw, not normalised, features.

    The headline ``rs`` is ``R*(P_teacher(student), target)`` (:mod:`xkd.stats`): how task-relevant the
    part of the first model's features that the second model does not explain is; the authors'
    ``pdCor.P_DC(student, teacher, target)``, reported as ``{student}_given_{teacher}`` by
    ``compute_partial_metrics`` (their README: "useful knowledge unique to the student beyond the
    teacher"). With a KD student and its base model (same architecture trained without KD) as the second
    model it is their ``student_kd_given_base_model``, "the features learned because of KD"; the second
    model may equally be the teacher.

    Deviation: the target is xkd's offline stand-in for the authors' CLIP class prototypes
    (:func:`xkd.stats.class_target`; see the module docstring for the other deviations).

    Args:
        student_feats, teacher_feats: ``(N, ...)`` features of the same images (first and second model).
        labels: class indices ``(N,)``.
        target: ``"onehot"`` or ``"class_mean"`` (see :func:`xkd.stats.class_target`).
        num_classes: one-hot width (does not change the value).
        target_feats: features whose class prototypes form the ``"class_mean"`` target (default ``teacher_feats``).

    Returns:
        A dict; each key with the authors' report entry it equals (``rsfss_common``):

        * ``"rs"`` = ``"rs_student_given_teacher"``: ``R*(P_teacher(student), target)``, their
          ``{student}_given_{teacher}`` (``P_DC``, section "partial");
        * ``"rs_teacher_given_student"``: ``R*(P_student(teacher), target)``, their
          ``{teacher}_given_{student}`` ("useful residual knowledge still present in the teacher but not
          learned by the student");
        * ``"rs_student"``, ``"rs_teacher"``: ``R*(features, target)``, their ``{model}_vs_ground_truth``
          (``New_DC``, section "similarity", "direct relevance");
        * ``"pdcor_student_target_given_teacher"``: ``R*(student, target; teacher)``, the partial dCor with
          both sides projected (xkd's addition; not in the authors' report);
        * ``"fss"``: :func:`fss` of the pair (the authors' ``teacher_vs_{student}``) and ``"fss_unbiased"``:
          :func:`fss_unbiased` (xkd's variant);
        * ``"target"``, ``"n"``: the target used and the number of images.
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
            "fss": float(dcor_v_sqr(student_feats, teacher_feats, normalize=True)),
            "fss_unbiased": float(u_correlation(a, b)),
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


FEATURE_FLUSH_BYTES = 256 * 2**20
"""Device memory :func:`model_features` fills with features before it copies them to the host."""


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
    feats, pending, labels = [], [], []
    pending_bytes = 0
    device = model_device(model, torch.device("cpu"))
    # features stay on the device while batches are queued (no host sync per batch) and go to the host
    # every FEATURE_FLUSH_BYTES, so an early layer's features of many images do not fill a GPU
    with eval_mode(model), torch.no_grad():
        with capture_features(model, [layer], detach=True, reduce=lambda _p, o: o.flatten(1).float()) as got:
            for images, lab in _batches(data, batch_size):
                got.clear()
                model(images.to(device))
                if layer not in got:
                    raise RuntimeError(f"layer {layer!r} was not called in the forward pass of {type(model).__name__}")
                pending.append(got[layer])
                pending_bytes += got[layer].nbytes
                labels.append(lab)
                if pending_bytes >= FEATURE_FLUSH_BYTES:
                    feats.append(torch.cat(pending).cpu())  # one read of the device per flush
                    pending, pending_bytes = [], 0
    if pending:
        feats.append(torch.cat(pending).cpu())
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
        ``{"fss": the authors' FSS, "fss_unbiased": xkd's R* variant, "rs": {rs(...) dict},
        "student_layer", "teacher_layer", "n"}``; ``rs`` is None when no labels are given or found in ``images``.
    """
    f = pair_features(student, teacher, images, student_layer, teacher_layer, batch_size)
    labels = f.labels if labels is None else labels.cpu()
    out: dict[str, Any] = {"fss": fss(f.student, f.teacher), "fss_unbiased": fss_unbiased(f.student, f.teacher)}
    out.update(n=f.student.shape[0], student_layer=f.student_layer, teacher_layer=f.teacher_layer)
    out["rs"] = None if labels is None else rs(f.student, f.teacher, labels, target, num_classes)
    return out
