"""Classification metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xkd.data.base import Batch
from xkd.metrics import accuracy, confusion, evaluate_model, macro_f1, mean_cross_entropy, posthoc_agreement

PREDS = torch.tensor([0, 1, 1, 2])
LABELS = torch.tensor([0, 1, 2, 2])
# per class F1: class 0 = 1; class 1: P = 1/2, R = 1 -> 2/3; class 2: P = 1, R = 1/2 -> 2/3


def test_accuracy():
    assert accuracy(PREDS, LABELS) == 0.75
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    assert accuracy(logits, LABELS) == 0.75
    assert math.isnan(accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)))
    with pytest.raises(ValueError, match="predictions"):
        accuracy(PREDS, LABELS[:3])


def test_macro_f1_hand_computed():
    assert macro_f1(PREDS, LABELS, 3) == pytest.approx(7 / 9)
    # class 3 is neither predicted nor a label: no F1 (0/0), left out of the mean, not scored 0
    assert macro_f1(PREDS, LABELS, 4) == pytest.approx(7 / 9)
    # a class only predicted (3) or only a label scores 0 and counts: class 2 now P = 1, R = 1/2
    assert macro_f1(torch.tensor([0, 1, 1, 3]), LABELS, 4) == pytest.approx((1 + 2 / 3 + 0 + 0) / 4)
    assert math.isnan(macro_f1(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3))
    with pytest.raises(ValueError, match="0..2"):
        macro_f1(torch.tensor([3]), torch.tensor([0]), 3)


def _f1_by_hand(preds: list[int], labels: list[int]) -> float:
    """Macro-F1 from counts, over the classes in either list: F1_c = 2 TP / (2 TP + FP + FN)."""
    scores = []
    for c in sorted(set(preds) | set(labels)):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def test_identical_predictions_covering_3_of_4_classes_score_f1_one():
    """Issue 13, finding 7: a student that agrees with the teacher on every image, where the
    teacher predicts only 3 of the 4 classes, has post-hoc accuracy 1.0 and must have F1 1.0
    (it scored 0.75 when the never-predicted class counted as F1 = 0)."""
    from sklearn.metrics import f1_score

    teacher = [0, 1, 2, 0, 1, 2, 2]
    present = sorted(set(teacher))  # [0, 1, 2]: class 3 is in neither set
    reference = f1_score(teacher, teacher, average="macro", labels=present)
    assert reference == pytest.approx(1.0) == pytest.approx(_f1_by_hand(teacher, teacher))
    out = posthoc_agreement(torch.tensor(teacher), torch.nn.functional.one_hot(torch.tensor(teacher), 4).float(), 4)
    assert out["accuracy"] == 1.0
    assert out["macro_f1"] == pytest.approx(reference)
    assert macro_f1(torch.tensor(teacher), torch.tensor(teacher), 4) == pytest.approx(1.0)
    # and with disagreements, against sklearn restricted to the present classes and the counts
    student = [0, 1, 1, 0, 2, 2, 0]
    union = sorted(set(student) | set(teacher))
    expected = f1_score(teacher, student, average="macro", labels=union)
    assert expected == pytest.approx(_f1_by_hand(student, teacher))
    assert posthoc_agreement(torch.tensor(student), torch.tensor(teacher), 4)["macro_f1"] == pytest.approx(expected)


def test_confusion_rows_true_columns_predicted():
    cm = confusion(PREDS, LABELS, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert cm.dtype == torch.int64
    with pytest.raises(ValueError, match="0..2"):
        confusion(torch.tensor([3]), torch.tensor([0]), 3)


def test_mean_cross_entropy():
    assert mean_cross_entropy(torch.zeros(3, 2), torch.tensor([0, 1, 0])) == pytest.approx(math.log(2))
    assert mean_cross_entropy(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1])) == pytest.approx(math.log(4 / 3))


def test_posthoc_agreement_uses_teacher_predictions_as_labels():
    teacher_logits = torch.nn.functional.one_hot(LABELS, 3).float()
    out = posthoc_agreement(PREDS, teacher_logits, 3)
    assert out["accuracy"] == out["posthoc_agreement"] == 0.75
    assert out["macro_f1"] == pytest.approx(7 / 9)


def test_evaluate_model_on_batches():
    # zero weights: logits (0, 0) for every image -> prediction 0, probabilities 1/2, loss ln 2
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    model.train()
    labels = torch.tensor([0, 0, 1, 1, 0])
    images = torch.rand(5, 1, 2, 2)
    loader = [Batch(images[:3], labels[:3]), Batch(images[3:], labels[3:], torch.ones(2, 2, 2, dtype=torch.bool))]
    out = evaluate_model(model, loader, 2, "cpu")
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["macro_f1"] == pytest.approx((0.75 + 0) / 2)  # class 0: P = 3/5, R = 1 -> F1 = 3/4
    assert out["loss"] == pytest.approx(math.log(2))
    assert out["confusion_matrix"].tolist() == [[3, 0], [2, 0]]
    assert out["preds"].tolist() == [0] * 5 and out["labels"].tolist() == labels.tolist()
    torch.testing.assert_close(out["probs"], torch.full((5, 2), 0.5))
    assert model.training


@pytest.mark.parametrize("batches", [2, 4])
def test_evaluate_model_reads_the_device_once_not_per_batch(device, batches, monkeypatch):
    """On a GPU each read (``.cpu()``) waits for the device: the batches' outputs stay there until the
    loop has queued them all, then the logits and the labels are read once each."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).to(device)
    n = 3 * batches
    images, labels = torch.rand(n, 1, 2, 2, device=device), (torch.arange(n) % 3).to(device)
    loader = [Batch(images[i : i + 3], labels[i : i + 3]) for i in range(0, n, 3)]
    moved = []
    real = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: moved.append(tuple(t.shape)) or real(t, *a, **k))
    out = evaluate_model(model, loader, 3, device)
    assert moved[:2] == [(n, 3), (n,)] and (3, 3) not in moved and (3,) not in moved  # no batch read alone
    assert out["labels"].tolist() == (torch.arange(n) % 3).tolist() and out["probs"].shape == (n, 3)
