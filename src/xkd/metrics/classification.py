"""Classification metrics, and MED-TEX's post-hoc agreement of a student with its teacher.

Predictions may be class indices ``(N,)`` or logits/probabilities ``(N, K)`` (arg-maxed).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import Tensor, nn

from xkd.metrics.base import metric
from xkd.models.state import eval_mode, model_device


def _classes(preds: Tensor | Any) -> Tensor:
    preds = torch.as_tensor(preds)
    return (preds.argmax(dim=1) if preds.ndim == 2 else preds).long().cpu()


def _pair(preds: Any, labels: Any) -> tuple[Tensor, Tensor]:
    p, y = _classes(preds), torch.as_tensor(labels).long().cpu()
    if p.shape != y.shape:
        raise ValueError(f"{p.shape[0]} predictions but {y.shape[0]} labels")
    return p, y


@metric("accuracy", scope="test", inputs=("predictions", "labels"), higher_is_better=True, category="classification")
def accuracy(preds: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy: the fraction of predictions equal to the label (nan for no images)."""
    p, y = _pair(preds, labels)
    return float((p == y).float().mean()) if len(y) else float("nan")


@metric(
    "macro_f1",
    scope="test",
    inputs=("predictions", "labels", "num_classes"),
    higher_is_better=True,
    category="classification",
    label="Macro-F1",
)
def macro_f1(preds: Tensor, labels: Tensor, num_classes: int) -> float:
    """Macro-averaged F1: the unweighted mean of the per-class F1 over the classes **present in
    either set**, the predictions or the labels (``sklearn.metrics.f1_score``'s default label set,
    ``average="macro"``).

    A class of ``0..num_classes-1`` that is neither predicted nor a label has no F1 (0/0) and is
    left out of the mean: counting it as 0 would score identical predictions that cover 3 of 4
    classes at F1 0.75 with accuracy 1.0 -- against the teacher's predictions
    (:func:`posthoc_agreement`) a class the teacher never predicts would lower every student alike.
    A present class that is only predicted, or only a label, scores 0. ``num_classes`` bounds the
    class indices (``0..num_classes-1``); ``nan`` for no images.
    """
    p, y = _pair(preds, labels)
    if not len(y):
        return float("nan")
    present = torch.unique(torch.cat([p, y]))
    if int(present.min()) < 0 or int(present.max()) >= num_classes:
        raise ValueError(f"class indices must lie in 0..{num_classes - 1}")
    return float(f1_score(y.numpy(), p.numpy(), average="macro", labels=present.tolist(), zero_division=0))


@metric(
    "confusion_matrix",
    scope="test",
    inputs=("predictions", "labels", "num_classes"),
    higher_is_better=None,
    category="classification",
)
def confusion(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Confusion matrix ``(K, K)`` of counts (int64): rows are true classes, columns predictions."""
    p, y = _pair(preds, labels)
    if len(y) and (min(int(p.min()), int(y.min())) < 0 or max(int(p.max()), int(y.max())) >= num_classes):
        raise ValueError(f"class indices must lie in 0..{num_classes - 1}")
    return torch.bincount(y * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


@metric("loss", scope="test", inputs=("logits", "labels"), higher_is_better=False, category="classification")
def mean_cross_entropy(logits: Tensor, labels: Tensor) -> float:
    """Mean cross-entropy of ``logits`` ``(N, K)`` against integer labels."""
    return float(F.cross_entropy(torch.as_tensor(logits).float().cpu(), torch.as_tensor(labels).long().cpu()))


@metric(
    "posthoc_agreement",
    scope="test",
    inputs=("predictions", "teacher_predictions", "num_classes"),
    higher_is_better=True,
    category="classification",
    label="Post-hoc accuracy",
)
def posthoc_agreement(student_preds: Tensor, teacher_preds: Tensor, num_classes: int) -> dict[str, float]:
    """MED-TEX's post-hoc accuracy and F1: the student scored with the teacher's predictions as labels.

    The F1 is :func:`macro_f1`: averaged over the classes the student or the teacher predicts.

    Returns:
        ``{"posthoc_agreement": accuracy, "accuracy": ..., "macro_f1": ...}``.
    """
    acc = accuracy(student_preds, _classes(teacher_preds))
    return {
        "posthoc_agreement": acc,
        "accuracy": acc,
        "macro_f1": macro_f1(student_preds, _classes(teacher_preds), num_classes),
    }


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if hasattr(batch, "images") and hasattr(batch, "labels"):
        return batch.images, batch.labels
    return batch[0], batch[1]


def evaluate_model(
    model: nn.Module, loader: Iterable[Any], num_classes: int, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Run ``model`` over ``loader`` (of :class:`xkd.data.base.Batch`) in eval mode, without gradients.

    The model's train/eval flags are restored afterwards.

    Returns:
        ``accuracy``, ``macro_f1``, ``loss`` (mean cross-entropy over images), ``confusion_matrix``
        ``(K, K)`` tensor, and on the CPU ``preds`` ``(N,)``, ``probs`` ``(N, K)``, ``labels`` ``(N,)``.
    """
    device = torch.device(device) if device is not None else model_device(model, torch.device("cpu"))
    logits_all, labels_all = [], []
    with eval_mode(model), torch.no_grad():
        for batch in loader:  # outputs stay on the device until every batch is queued: no sync per batch
            images, labels = _unpack(batch)
            logits_all.append(model(images.to(device)).float())
            labels_all.append(torch.as_tensor(labels).long())
    logits = torch.cat(logits_all).cpu() if logits_all else torch.zeros(0, num_classes)
    labels = torch.cat(labels_all).cpu() if labels_all else torch.zeros(0, dtype=torch.long)
    preds = logits.argmax(dim=1)
    return {
        "accuracy": accuracy(preds, labels),
        "macro_f1": macro_f1(preds, labels, num_classes),
        "loss": mean_cross_entropy(logits, labels) if len(labels) else float("nan"),
        "confusion_matrix": confusion(preds, labels, num_classes),
        "preds": preds,
        "probs": logits.softmax(dim=1),
        "labels": labels,
    }


confusion_matrix = confusion
