"""DIST (Huang et al., NeurIPS 2022) against an independent numpy implementation of the authors'
formula: T^2 * (1 - mean Pearson correlation) of softmax(z / T), across classes per image (inter)
and across images per class (intra)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xkd.data.base import Batch
from xkd.distill import build_distiller
from xkd.distill.logits import dist_terms
from xkd.errors import ConfigError


def reference(zs: np.ndarray, zt: np.ndarray, t: float) -> tuple[float, float]:
    def softmax(z):
        e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def pearson_rows(a, b):
        return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])

    ys, yt = softmax(zs), softmax(zt)
    return t * t * (1 - pearson_rows(ys, yt).mean()), t * t * (1 - pearson_rows(ys.T, yt.T).mean())


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_relations_equal_the_reference_formula(t):
    g = np.random.default_rng(0)
    zs, zt = g.normal(size=(6, 5)) * 3, g.normal(size=(6, 5)) * 3
    inter, intra = dist_terms(torch.tensor(zs), torch.tensor(zt), t)
    ref_inter, ref_intra = reference(zs, zt, t)
    assert float(inter) == pytest.approx(ref_inter, rel=1e-5, abs=1e-7)
    assert float(intra) == pytest.approx(ref_intra, rel=1e-5, abs=1e-7)


def test_relations_ignore_shift_and_scale_but_not_the_order():
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    same, _ = dist_terms(z, z, 1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)  # identical logits: perfect relations
    reversed_inter, _ = dist_terms(z, -z, 1.0)
    assert float(reversed_inter) > 1.0  # the opposite class ranking: negative correlation


def test_dist_loss_terms_are_weighted_and_read_cached_teacher_logits(fixed_logits):
    # three images: with two, every per-class correlation is exactly +-1
    student = fixed_logits([[2.0, 0.5, -1.0], [0.1, 1.0, 0.3], [0.4, -0.2, 1.1]])
    teacher = fixed_logits([[1.5, 0.0, -0.5], [0.0, 2.0, 0.5], [-0.3, 0.2, 0.9]])
    d = build_distiller("dist", student, teacher, {"beta": 2.0, "gamma": 0.5, "temperature": 2.0})
    batch = Batch(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]), indices=torch.tensor([0, 1, 2]))
    _, terms = d(batch)
    ref_inter, ref_intra = reference(student.logits.detach().numpy(), teacher.logits.detach().numpy(), 2.0)
    # float32 logits against the float64 reference
    assert float(terms["inter"]) == pytest.approx(2.0 * ref_inter, rel=1e-4)
    assert float(terms["intra"]) == pytest.approx(0.5 * ref_intra, rel=1e-4)
    d.use_teacher_logits(teacher.logits.detach().clone())  # the pipeline's cache, read by index
    _, cached = d(batch)
    torch.testing.assert_close(cached["inter"], terms["inter"])
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        build_distiller("dist", student, teacher, {"temperature": 0.0})
