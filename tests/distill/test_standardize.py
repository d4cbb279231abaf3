"""Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024) of
``hinton_kd``, ``dkd`` and ``e2kd`` against an independent numpy implementation of the authors' code:
each sample's logits z-scored over the classes, ``(z - mean) / (1e-7 + std)`` with the unbiased std
(``ddof = 1``), for teacher and student, before dividing by the temperature."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xkd.data.base import Batch
from xkd.distill import build_distiller, distiller_params
from xkd.distill.logits import dkd_terms, kd_loss, standardize_logits
from xkd.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def zscore(z: np.ndarray) -> np.ndarray:
    return (z - z.mean(axis=1, keepdims=True)) / (1e-7 + z.std(axis=1, ddof=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_kd(zs: np.ndarray, zt: np.ndarray, t: float, standardize: bool) -> float:
    if standardize:
        zs, zt = zscore(zs), zscore(zt)
    ps, pt = softmax(zs / t), softmax(zt / t)
    return float(t * t * (pt * (np.log(pt) - np.log(ps))).sum(axis=1).mean())


def ref_dkd(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, t: float, standardize: bool) -> tuple[float, float]:
    """TCKD and NCKD (Zhao et al. 2022, eq. 1-3) from probabilities, as mdistiller writes them."""
    if standardize:
        zs, zt = zscore(zs), zscore(zt)
    ps, pt = softmax(zs / t), softmax(zt / t)
    tckd = nckd = 0.0
    for i, c in enumerate(y):
        bs, bt = np.array([ps[i, c], 1 - ps[i, c]]), np.array([pt[i, c], 1 - pt[i, c]])
        tckd += (bt * np.log(bt / bs)).sum()
        others = [k for k in range(zs.shape[1]) if k != c]
        qs, qt = ps[i, others] / ps[i, others].sum(), pt[i, others] / pt[i, others].sum()
        nckd += (qt * np.log(qt / qs)).sum()
    n = len(y)
    return t * t * tckd / n, t * t * nckd / n


@pytest.fixture
def logits():
    g = np.random.default_rng(0)
    # the teacher's logits spread 4x wider than the student's: standardisation removes the gap
    return g.normal(size=(6, 5)) * 1.5 + 0.3, g.normal(size=(6, 5)) * 6.0 - 2.0, np.array([0, 1, 2, 3, 4, 0])


def test_standardize_logits_is_the_z_score_with_the_unbiased_std(logits):
    zs, _, _ = logits
    got = standardize_logits(torch.tensor(zs)).double().numpy()
    np.testing.assert_allclose(got, zscore(zs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(got.std(axis=1, ddof=1), 1.0, rtol=1e-5)
    # constant logits stay finite (the eps): all zeros after centring
    assert torch.equal(standardize_logits(torch.full((1, 4), 3.0)), torch.zeros(1, 4))
    # one class has no spread to divide by (its unbiased std is NaN): an error, not a NaN loss
    with pytest.raises(ValueError, match=r"needs logits of shape \(N, classes >= 2\), got \(3, 1\)"):
        standardize_logits(torch.zeros(3, 1))


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("standardize", [False, True])
def test_kd_loss_equals_the_reference(logits, t, standardize):
    zs, zt, _ = logits
    got = float(kd_loss(torch.tensor(zs), torch.tensor(zt), t, standardize))
    assert got == pytest.approx(ref_kd(zs, zt, t, standardize), rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 4.0])
@pytest.mark.parametrize("standardize", [False, True])
def test_dkd_terms_equal_the_reference(logits, t, standardize):
    zs, zt, y = logits
    tckd, nckd = dkd_terms(torch.tensor(zs), torch.tensor(zt), torch.tensor(y), t, standardize)
    ref_t, ref_n = ref_dkd(zs, zt, y, t, standardize)
    assert float(tckd) == pytest.approx(ref_t, rel=1e-5, abs=1e-8)
    assert float(nckd) == pytest.approx(ref_n, rel=1e-5, abs=1e-8)


def test_standardized_kd_ignores_the_teachers_shift_and_scale_but_plain_kd_does_not(logits):
    zs, zt, _ = logits
    s, t = torch.tensor(zs), torch.tensor(zt)
    moved = 3.0 * t + 7.0
    assert float(kd_loss(s, moved, 2.0, True)) == pytest.approx(float(kd_loss(s, t, 2.0, True)), rel=1e-5)
    assert float(kd_loss(s, moved, 2.0)) != pytest.approx(float(kd_loss(s, t, 2.0)), rel=1e-2)
    # a student whose logits are an affine map of the teacher's has (almost) nothing left to learn
    assert float(kd_loss(0.25 * t - 1.0, t, 2.0, True)) == pytest.approx(0.0, abs=1e-6)


def test_default_off_leaves_the_losses_unchanged(logits):
    zs, zt, y = logits
    s, t = torch.tensor(zs), torch.tensor(zt)
    assert torch.equal(kd_loss(s, t, 4.0), kd_loss(s, t, 4.0, False))
    assert torch.equal(
        torch.stack(dkd_terms(s, t, torch.tensor(y), 4.0)), torch.stack(dkd_terms(s, t, torch.tensor(y), 4.0, False))
    )
    for name in ("hinton_kd", "dkd", "e2kd"):
        assert distiller_params(name, {}).standardize is False


def test_hinton_kd_and_dkd_distillers_standardize_both_models(fixed_logits, logits):
    zs, zt, y = logits
    batch = Batch(torch.zeros(6, 1, 2, 2), torch.tensor(y))
    kd = build_distiller(
        "hinton_kd",
        fixed_logits(zs.tolist()),
        fixed_logits(zt.tolist()),
        {"alpha": 0.1, "temperature": 2.0, "standardize": True},
    )
    _, terms = kd(batch)
    assert float(terms["kd"].detach()) == pytest.approx(0.9 * ref_kd(zs, zt, 2.0, True), rel=1e-5)
    # the CE term reads the raw logits
    ce = -np.log(softmax(zs)[np.arange(6), y]).mean()
    assert float(terms["ce"].detach()) == pytest.approx(0.1 * ce, rel=1e-5)
    dkd = build_distiller(
        "dkd",
        fixed_logits(zs.tolist()),
        fixed_logits(zt.tolist()),
        {"alpha": 2.0, "beta": 3.0, "temperature": 2.0, "standardize": True},
    )
    _, terms = dkd(batch)
    ref_t, ref_n = ref_dkd(zs, zt, y, 2.0, True)
    assert float(terms["tckd"].detach()) == pytest.approx(2.0 * ref_t, rel=1e-5)
    assert float(terms["nckd"].detach()) == pytest.approx(3.0 * ref_n, rel=1e-5)
    assert float(terms["ce"].detach()) == pytest.approx(ce, rel=1e-5)


def test_standardize_must_be_a_boolean():
    for name in ("hinton_kd", "dkd", "e2kd"):
        with pytest.raises(ConfigError, match="expected true or false"):
            distiller_params(name, {"standardize": "yes"})
