"""FSS / RS and the (partial) distance correlation behind them: known answers, dcor agreement, gradients, and
the UniCAM authors' formulas (gadhane/UniCAM ``pdCor.py``) written out in the test as references."""

from __future__ import annotations

import math

import dcor
import numpy as np
import pytest
import torch

import xkd.metrics.transfer as transfer_module
from xkd.metrics.transfer import fss, fss_unbiased, model_features, pair_features, rs, transfer_scores
from xkd.models import LayerNotFoundError
from xkd.registry import METRICS
from xkd.stats import (
    class_target,
    dcor_u,
    dcor_v,
    dcor_v_sqr,
    distance_matrix,
    partial_dcor,
    residual_dcor,
    u_centered,
    u_correlation,
    u_residual,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def authors_fss(x: np.ndarray, y: np.ndarray, guards: bool = False) -> float:
    """The UniCAM authors' FSS (``pdCor.Distance_Correlation``) from its definition, in numpy: each row scaled
    to unit L2 norm, Euclidean distances from explicit pairwise differences, double-centred, then
    ``Γ_XY / sqrt(Γ_XX Γ_YY)`` with ``Γ = mean of the elementwise product``. ``guards``: with their epsilons
    (1e-12 under each distance's root, 1e-9 under the denominator's)."""
    eps_d, eps_r = (1e-12, 1e-9) if guards else (0.0, 0.0)

    def centred(f: np.ndarray) -> np.ndarray:
        f = f.reshape(len(f), -1)
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1) + eps_d)
        return d - d.mean(axis=0, keepdims=True) - d.mean(axis=1, keepdims=True) + d.mean()

    a, b = centred(x), centred(y)
    return float((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean() + eps_r))


def authors_u(f: np.ndarray) -> np.ndarray:
    """The authors' ``P_Distance_Matrix`` from its definition: U-centred distances of raw features, 0 diagonal."""
    f = f.reshape(len(f), -1)
    n = len(f)
    d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
    u = (
        d
        - d.sum(axis=0, keepdims=True) / (n - 2)
        - d.sum(axis=1, keepdims=True) / (n - 2)
        + d.sum() / ((n - 1) * (n - 2))
    )
    np.fill_diagonal(u, 0.0)
    return u


def authors_corr(a: np.ndarray, b: np.ndarray) -> float:
    """The authors' ``Correlation`` of U-centred matrices, with ``(A . B) = sum(A * B) / (n (n - 3))``."""
    n = len(a)

    def br(p: np.ndarray, q: np.ndarray) -> float:
        return float((p * q).sum() / (n * (n - 3)))

    return br(a, b) / np.sqrt(br(a, a) * br(b, b))


def authors_pdc(x: np.ndarray, z: np.ndarray, y: np.ndarray) -> float:
    """The authors' ``P_DC(x, z, y)``: ``Correlation(P_removal(U(x), U(z)), U(y))``, ``P_removal(A, C) = A -
    (A . C) / (C . C) C``."""
    a, c = authors_u(x), authors_u(z)
    n = len(a)
    proj = a - ((a * c).sum() / (n * (n - 3))) / ((c * c).sum() / (n * (n - 3))) * c
    return authors_corr(proj, authors_u(y))


def test_u_centering_and_partial_dcor_match_the_hand_worked_examples():
    # Székely-Rizzo U-centring of the 4x4 matrix worked in dcor's documentation
    a = torch.tensor([[0.0, 3, 11, 6], [3, 0, 8, 3], [11, 8, 0, 5], [6, 3, 5, 0]], dtype=torch.float64)
    expected = torch.tensor([[0.0, -2, 1, 1], [-2, 0, 1, 1], [1, 1, 0, -2], [1, 1, -2, 0]], dtype=torch.float64)
    torch.testing.assert_close(u_centered(a), expected, atol=1e-12, rtol=0)
    # partial dCor examples of dcor's documentation: R*(a, b; c) = -0.5, R*(a, a; c) = 1, R*(a, c; c) = 0
    x = torch.tensor([[1.0], [1], [2], [2], [3]])
    y = torch.tensor([[1.0], [2], [1], [2], [1]])
    z = torch.tensor([[1.0], [2], [2], [1], [2]])
    assert float(partial_dcor(x, y, z)) == pytest.approx(-0.5, abs=1e-12)
    assert float(partial_dcor(x, x, z)) == pytest.approx(1.0, abs=1e-12)
    assert float(partial_dcor(x, z, z)) == pytest.approx(0.0, abs=1e-12)


def test_distance_matrix_is_euclidean_with_zero_diagonal():
    x = randn(7, 2, 3, seed=1)
    torch.testing.assert_close(distance_matrix(x), torch.cdist(x.flatten(1), x.flatten(1)), atol=1e-12, rtol=0)
    dup = torch.cat([x, x[:2]])  # duplicated samples: exact zero distances, finite gradients
    dup.requires_grad_(True)
    d = distance_matrix(dup)
    assert d[0, 7] == 0 and d[1, 8] == 0
    (g,) = torch.autograd.grad(d.sum(), dup)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("n, dx, dy", [(6, 1, 1), (30, 5, 3), (120, 64, 16)])
def test_torch_statistics_match_dcor(n, dx, dy):
    x = randn(n, dx, seed=n)
    y = x[:, :1] ** 2 + 0.5 * randn(n, dy, seed=n + 1)  # dependent, nonlinearly
    z = x[:, -1:] + randn(n, 2, seed=n + 2)
    xn, yn, zn = x.numpy(), y.numpy(), z.numpy()
    assert float(dcor_u(x, y)) == pytest.approx(dcor.u_distance_correlation_sqr(xn, yn), abs=1e-6)
    assert float(partial_dcor(x, y, z)) == pytest.approx(dcor.partial_distance_correlation(xn, yn, zn), abs=1e-6)
    assert float(dcor_v(x, y)) == pytest.approx(dcor.distance_correlation(xn, yn), abs=1e-6)
    assert float(dcor_v_sqr(x, y)) == pytest.approx(dcor.distance_correlation_sqr(xn, yn), abs=1e-6)
    unit = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in (xn, yn)]  # FSS: dCor^2 of unit rows
    assert fss(x, y) == pytest.approx(dcor.distance_correlation_sqr(*unit), abs=1e-6)
    assert fss_unbiased(x, y) == pytest.approx(dcor.u_distance_correlation_sqr(xn, yn), abs=1e-6)
    # the residual projection equals dcor's complementary projection
    ua, uc = u_centered(distance_matrix(x)), u_centered(distance_matrix(z))
    expected = dcor.u_complementary_projection(dcor.u_centered(dcor.distances.pairwise_distances(zn)))(
        dcor.u_centered(dcor.distances.pairwise_distances(xn))
    )
    np.testing.assert_allclose(u_residual(ua, uc).numpy(), expected, atol=1e-9)
    # float32 features are computed in float64: same values to 1e-6
    assert float(dcor_u(x.float(), y.float())) == pytest.approx(dcor.u_distance_correlation_sqr(xn, yn), abs=1e-6)


def test_independent_features_score_near_zero_with_fss_unbiased_not_with_the_authors_fss():
    # under independence R* ~ t / sqrt(n(n-3)/2) (Székely & Rizzo 2013): 5 standard deviations at n=400 is 0.018
    n = 400
    tol = 5 * math.sqrt(2 / (n * (n - 3)))
    for seed in range(3):
        assert abs(fss_unbiased(randn(n, 256, seed=seed), randn(n, 256, seed=100 + seed))) < tol
    # while the authors' V-statistic FSS of independent features is far from 0 (documented: compare at equal n)
    assert fss(randn(64, 4096, seed=1), randn(64, 4096, seed=2)) > 0.9
    assert float(dcor_v(randn(64, 4096, seed=1), randn(64, 4096, seed=2))) > 0.9


def test_identical_and_similarity_transformed_features_score_one():
    x = randn(50, 12, seed=3)
    q, _ = torch.linalg.qr(randn(12, 12, seed=4))  # orthogonal
    stretch = x @ torch.diag(torch.linspace(0.1, 10, 12, dtype=torch.float64))
    for f in (fss, fss_unbiased):
        assert f(x, x) == pytest.approx(1.0, abs=1e-12)
        assert f(x.view(50, 3, 4), (x @ q).view(50, 2, 2, 3)) == pytest.approx(1.0, abs=1e-10)  # flattened per sample
        assert f(x, 3.7 * x @ q) == pytest.approx(1.0, abs=1e-10)
        # an invertible but non-similarity linear map is not distance-preserving: < 1
        assert f(x, stretch) < 0.99
    # R* is translation invariant; the authors' FSS normalises each row first, so it is not
    assert fss_unbiased(x, x @ q + 5.0) == pytest.approx(1.0, abs=1e-10)
    assert fss(x, x @ q + 5.0) < 0.99


def test_fss_is_the_authors_distance_correlation_of_unit_rows():
    """FSS = the authors' ``pdCor.Distance_Correlation`` (reference written above from its definition); it
    differs from the bias-corrected R* xkd reported as FSS before."""
    x = randn(20, 8, seed=21)
    y = torch.tanh(x[:, :3]) + 0.8 * randn(20, 3, seed=22)  # dependent, nonlinearly
    xn, yn = x.numpy(), y.numpy()
    expected = authors_fss(xn, yn)
    assert fss(x, y) == pytest.approx(expected, abs=1e-12)
    assert fss(x.float(), y.float()) == pytest.approx(expected, abs=1e-6)  # float32 features: float64 inside
    assert abs(fss_unbiased(x, y) - expected) > 0.1  # not the bias-corrected statistic (the old FSS)
    # the authors' numerical guards move it by less than 1e-5 (documented in xkd.stats)
    assert abs(authors_fss(xn, yn, guards=True) - expected) < 1e-5
    # rescaling each image's feature vector changes nothing after the row normalisation (R* does change)
    scaled = y * torch.linspace(0.2, 5.0, 20, dtype=torch.float64)[:, None]
    assert fss(x, scaled) == pytest.approx(expected, abs=1e-12)
    assert abs(fss_unbiased(x, scaled) - fss_unbiased(x, y)) > 0.01


def test_fss_by_hand_on_four_points():
    """Four images: the student's features are the corners of a square (unit rows), the teacher's the same
    directions at lengths 1, 2, 3, 4; after the authors' row normalisation the two geometries are identical."""
    s = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float64)
    t = s * torch.tensor([1.0, 2, 3, 4], dtype=torch.float64)[:, None]
    assert fss(s, t) == pytest.approx(1.0, abs=1e-12)
    # by hand: move the teacher's last corner onto its second (rows 1 and 3 equal). Unit-row distances
    # (r = sqrt 2): student a = [[0,r,2,r],[r,0,r,2],[2,r,0,r],[r,2,r,0]], every row mean (1 + r)/2 = the grand
    # mean, so A = a - (1 + r)/2; teacher b = [[0,r,2,r],[r,0,r,0],[2,r,0,r],[r,0,r,0]], row means
    # m = [(1+r)/2, r/2, (1+r)/2, r/2], grand mean (1 + 2r)/4, so B = b - m_i - m_j + (1 + 2r)/4
    t2 = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, 1]], dtype=torch.float64)
    r = math.sqrt(2)
    a = np.array([[0, r, 2, r], [r, 0, r, 2], [2, r, 0, r], [r, 2, r, 0]])
    b = np.array([[0, r, 2, r], [r, 0, r, 0], [2, r, 0, r], [r, 0, r, 0]])
    m = np.array([(1 + r) / 2, r / 2, (1 + r) / 2, r / 2])
    ca, cb = a - (1 + r) / 2, b - m[:, None] - m[None, :] + (1 + 2 * r) / 4
    by_hand = (ca * cb).mean() / math.sqrt((ca * ca).mean() * (cb * cb).mean())
    assert fss(s, t2) == pytest.approx(by_hand, abs=1e-12)
    assert fss(s, t2) == pytest.approx(authors_fss(s.numpy(), t2.numpy()), abs=1e-12)


def test_projection_removes_the_conditioning_variable():
    x, y = randn(40, 3, seed=5), randn(40, 2, seed=6)
    assert float(partial_dcor(x, y, x)) == pytest.approx(0.0, abs=1e-10)
    assert float(residual_dcor(x, y, x)) == pytest.approx(0.0, abs=1e-10)
    ux, uy = u_centered(distance_matrix(x)), u_centered(distance_matrix(y))
    assert float(u_correlation(u_residual(ux, uy), uy)) == pytest.approx(0.0, abs=1e-10)  # residual is orthogonal
    assert torch.equal(u_residual(ux, torch.zeros_like(uy)), ux)  # a constant z explains nothing


def test_gradients_pass_gradcheck():
    x = randn(6, 3, seed=7).requires_grad_(True)
    y, z = randn(6, 2, seed=8), randn(6, 2, seed=9)
    assert torch.autograd.gradcheck(lambda a: dcor_u(a, y), (x,))
    assert torch.autograd.gradcheck(lambda a: partial_dcor(a, y, z), (x,))
    assert torch.autograd.gradcheck(lambda a: residual_dcor(a, y, z), (x,))


def test_class_targets():
    labels = torch.tensor([0, 2, 0, 1])
    torch.testing.assert_close(class_target(labels, "onehot", 3), torch.eye(3, dtype=torch.float64)[labels])
    # the authors' prototype recipe: unit rows, averaged per class, the average scaled to unit length;
    # class 0: [1, 0] and [3, 4] / 5 = [0.6, 0.8] average [0.8, 0.4], unit [2, 1] / sqrt 5
    emb = torch.tensor([[1.0, 0], [5, 5], [3, 4], [7, 1]])
    proto0 = [2 / math.sqrt(5), 1 / math.sqrt(5)]
    expected = torch.tensor([proto0, [0.5**0.5, 0.5**0.5], proto0, [7 / 50**0.5, 1 / 50**0.5]], dtype=torch.float64)
    torch.testing.assert_close(class_target(labels, "class_mean", embeddings=emb), expected)
    # with the class count (UniCAM passes it: no unique(), no host sync) the same rows, also for
    # labels that skip classes
    assert torch.equal(class_target(labels, "class_mean", 3, emb), class_target(labels, "class_mean", embeddings=emb))
    gaps = torch.tensor([5, 0, 3, 0])
    assert torch.equal(class_target(gaps, "class_mean", 6, emb), class_target(gaps, "class_mean", embeddings=emb))
    assert torch.equal(class_target(gaps, "class_mean", 6, emb)[1], class_target(gaps, "class_mean", 6, emb)[3])
    with pytest.raises(ValueError, match="'onehot' or 'class_mean'"):
        class_target(labels, "clip")
    with pytest.raises(ValueError, match="needs embeddings"):
        class_target(labels, "class_mean")


def test_rs_known_answers():
    labels = torch.arange(40) % 4
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    noise = randn(40, 6, seed=10)
    out = rs(onehot, noise, labels)
    assert out["rs_student"] == pytest.approx(1.0, abs=1e-12)  # features = the target
    assert out["rs"] == out["rs_student_given_teacher"]
    assert out["rs"] > 0.95  # noise explains almost none of it
    assert abs(out["rs_teacher"]) < 0.05
    # the student is the teacher: nothing is left beyond it
    same = rs(noise, noise, labels)
    assert same["rs"] == pytest.approx(0.0, abs=1e-10) and same["fss"] == pytest.approx(1.0, abs=1e-12)
    # class_mean of features that are the one-hot labels is the one-hot target itself
    assert rs(onehot, noise, labels, "class_mean", target_feats=onehot)["rs_student"] == pytest.approx(1.0, abs=1e-12)
    assert out["n"] == 40 and out["target"] == "onehot"


def test_rs_entries_are_the_authors_statistics():
    """Each RS entry against the authors' ``P_DC`` / ``New_DC`` / ``Distance_Correlation`` written out above
    (raw features; the target stands in for their CLIP prototypes)."""
    labels = torch.arange(24) % 3
    target = torch.nn.functional.one_hot(labels, 3).double()
    s = randn(24, 5, seed=31) + 1.5 * target @ randn(3, 5, seed=32)  # class-relevant student
    t = s[:, :2] + 0.7 * randn(24, 2, seed=33)  # a teacher sharing part of it
    sn, tn, yn = s.numpy(), t.numpy(), target.numpy()
    out = rs(s, t, labels)
    assert out["rs"] == pytest.approx(authors_pdc(sn, tn, yn), abs=1e-10)  # student_given_teacher
    assert out["rs_teacher_given_student"] == pytest.approx(authors_pdc(tn, sn, yn), abs=1e-10)
    assert out["rs_student"] == pytest.approx(authors_corr(authors_u(sn), authors_u(yn)), abs=1e-10)  # New_DC
    assert out["rs_teacher"] == pytest.approx(authors_corr(authors_u(tn), authors_u(yn)), abs=1e-10)
    assert out["fss"] == pytest.approx(authors_fss(sn, tn), abs=1e-10)  # teacher_vs_student
    assert out["fss_unbiased"] == pytest.approx(authors_corr(authors_u(sn), authors_u(tn)), abs=1e-10)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least 4"):
        fss(randn(3, 2), randn(3, 2))
    with pytest.raises(ValueError, match="same samples"):
        fss(randn(5, 2), randn(6, 2))
    with pytest.raises(ValueError, match="same samples"):
        rs(randn(5, 2), randn(5, 2), torch.zeros(6, dtype=torch.long))


def test_metrics_are_registered():
    info = METRICS.get("fss")
    assert info.higher_is_better is True and info.category == "transfer" and info.fn is fss
    assert info.needs == ("student_features", "teacher_features") and info.scope == "transfer"
    assert info.default is True and "authors" in info.description
    unbiased = METRICS.get("fss_unbiased")  # xkd's variant: registered, not computed by default
    assert unbiased.fn is fss_unbiased and unbiased.default is False and unbiased.scope == "transfer"
    assert unbiased.needs == info.needs and "not the authors" in unbiased.description
    assert unbiased.label != info.label
    assert METRICS.get("rs").fn is rs and METRICS.get("rs").higher_is_better is True


def test_features_are_read_from_the_device_once_not_per_batch(tiny_pair, monkeypatch):
    student, _ = tiny_pair
    images = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    moved = []
    real = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: moved.append(t.shape[0]) or real(t, *a, **k))
    s, _ = model_features(student, images, "blocks.2.0", batch_size=3)
    assert moved == [12] and s.device.type == "cpu" and s.shape[0] == 12  # one read for the four batches
    # past FEATURE_FLUSH_BYTES the features go to the host (a GPU is not filled by an early layer's)
    moved.clear()
    monkeypatch.setattr(transfer_module, "FEATURE_FLUSH_BYTES", 2 * s[:3].nbytes)
    again, _ = model_features(student, images, "blocks.2.0", batch_size=3)
    assert moved == [6, 6] and torch.equal(again, s)


def test_features_of_two_models_and_transfer_scores(tiny_pair):
    student, teacher = tiny_pair
    images = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12) % 3
    student.train()
    s, lab = model_features(student, images, "blocks.2.0", batch_size=5)
    assert student.training  # eval mode was scoped
    with torch.no_grad():
        student.eval()
        direct = {}
        h = student.get_submodule("blocks.2.0").register_forward_hook(lambda m, i, o: direct.update(o=o))
        student(images)
        h.remove()
    torch.testing.assert_close(s, direct["o"].flatten(1))
    assert lab is None
    batches = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    f = pair_features(student, teacher, batches, "blocks.2.0", "layer3")
    s2, t2 = f.student, f.teacher
    torch.testing.assert_close(s2, s)
    assert torch.equal(f.labels, labels) and t2.shape[0] == 12
    assert (f.student_layer, f.teacher_layer) == ("blocks.2.0", "layer3")
    assert pair_features(student, teacher, images).teacher_layer == "layer3"  # default layers
    out = transfer_scores(student, teacher, batches, student_layer="blocks.2.0", teacher_layer="layer3")
    assert out["fss"] == pytest.approx(float(dcor_v_sqr(s2, t2, normalize=True)), abs=1e-12)
    assert out["fss_unbiased"] == pytest.approx(float(dcor_u(s2, t2)), abs=1e-12)
    assert out["rs"]["rs"] == pytest.approx(rs(s2, t2, labels)["rs"], abs=1e-12)
    assert transfer_scores(student, student, images)["fss"] == pytest.approx(1.0, abs=1e-9)  # default layers
    assert transfer_scores(student, teacher, images)["rs"] is None  # no labels
    with pytest.raises(LayerNotFoundError, match="blocks"):
        model_features(student, images, "nope")
