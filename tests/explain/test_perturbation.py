"""KernelSHAP and LIME on superpixels: exact known answers, brute-force Shapley values, batching and contract."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from xkd.config import ConfigError
from xkd.explain.base import build_explainer, check_maps
from xkd.explain.perturbation import (
    LIME,
    KernelSHAP,
    baseline_images,
    lime_design,
    shap_design,
    solve_weighted_ridge,
)
from xkd.explain.superpixel import slic_segments

pytestmark = pytest.mark.usefixtures("one_thread")


def grid_segments(n: int, h: int = 8, w: int = 12, rows: int = 2, cols: int = 3) -> torch.Tensor:
    """Hand-made segmentation: a rows x cols grid of blocks labelled row-major (6 segments by default)."""
    r = torch.arange(h) * rows // h
    c = torch.arange(w) * cols // w
    return (r[:, None] * cols + c[None, :]).expand(n, h, w).clone()


def segment_means(x: torch.Tensor, seg: torch.Tensor, m: int) -> torch.Tensor:
    """(N, m) mean of channel 0 over each segment (the segmentation is shared by all images)."""
    return torch.stack([x[:, 0][:, seg[0] == s].mean(dim=1) for s in range(m)], dim=1)


def per_segment(maps: torch.Tensor, seg: torch.Tensor, m: int) -> torch.Tensor:
    """The constant value each segment holds in superpixel-form maps (asserting it is constant)."""
    vals = []
    for s in range(m):
        v = maps[:, seg[0] == s]
        assert (v - v[:, :1]).abs().max() == 0
        vals.append(v[:, 0])
    return torch.stack(vals, dim=1)


class SegmentGame(nn.Module):
    """Logits (g, -g) where g is a function of the grid segments' means of channel 0."""

    def __init__(self, fn, h: int = 8, w: int = 12, rows: int = 2, cols: int = 3) -> None:
        super().__init__()
        self.fn = fn
        seg = grid_segments(1, h, w, rows, cols)[0]
        self.m = rows * cols
        onehot = torch.stack([(seg == s).float() / (seg == s).sum() for s in range(self.m)])
        self.register_buffer("avg", onehot.flatten(1).T)  # (H*W, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.fn(x[:, 0].flatten(1) @ self.avg)
        return torch.stack([g, -g], dim=1)


W6 = torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0, -1.5])


def additive(means: torch.Tensor) -> torch.Tensor:
    return means @ W6


def shape_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Dark noisy images with a bright square and a mid-grey bar (SLIC finds ~10-19 segments)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.1
    x[:, :, 3:8, 3:8] = 1.0
    x[:, :, 10:14, 2:14] = 0.5
    return x


# ----------------------------------------------------------------------------------------------
# KernelSHAP known answers


@pytest.mark.parametrize("baseline", ["zero", "mean", "blur"])
@pytest.mark.parametrize("n_samples", [64, 20])  # 2^6 = 64: enumerated; 20: sampled coalitions
def test_kernel_shap_of_an_additive_model_is_exact(baseline, n_samples):
    # f(x) = sum_s w_s mean_s(x) is additive in the coalition: phi_s = w_s (mean_s(x) - mean_s(b)) exactly,
    # whatever coalitions were drawn (the weighted regression fits it with zero residual)
    x = torch.rand(3, 1, 8, 12)
    seg = grid_segments(3)
    maps = KernelSHAP(SegmentGame(additive), {"n_samples": n_samples, "baseline": baseline, "output": "logit"}).explain(
        x, torch.zeros(3, dtype=torch.long), segments=seg
    )
    b = baseline_images(x, baseline, 3.0)
    expected = W6 * (segment_means(x, seg, 6) - segment_means(b, seg, 6))
    torch.testing.assert_close(per_segment(maps.maps, seg, 6), expected, rtol=0, atol=2e-6)
    assert maps.method == "kernel_shap" and maps.layer is None


def brute_force_shapley(game, m: int) -> list[float]:
    """phi_i = sum_{S not containing i} |S|! (m-|S|-1)! / m! (v(S + i) - v(S))."""
    phi = []
    for i in range(m):
        total = 0.0
        others = [j for j in range(m) if j != i]
        for r in range(m):
            for subset in itertools.combinations(others, r):
                weight = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
                total += weight * (game(set(subset) | {i}) - game(set(subset)))
        phi.append(total)
    return phi


def test_kernel_shap_enumeration_equals_brute_force_shapley_values():
    # a non-additive game: interaction m0*m1, max(m2, m3), m4^2, m5 dummy-free linear term
    def fn(m):
        return 3 * m[:, 0] * m[:, 1] + torch.maximum(m[:, 2], m[:, 3]) - 2 * m[:, 4] ** 2 + 0.7 * m[:, 5]

    x = torch.rand(2, 1, 8, 12) + 0.5
    seg = grid_segments(2)
    model = SegmentGame(fn)
    maps = KernelSHAP(model, {"n_samples": 64, "baseline": "zero", "output": "logit"}).explain(
        x, torch.zeros(2, dtype=torch.long), segments=seg
    )
    got = per_segment(maps.maps, seg, 6)
    means = segment_means(x, seg, 6)
    for k in range(2):

        def game(kept, k=k):
            return float(fn((means[k] * torch.tensor([float(s in kept) for s in range(6)]))[None])[0])

        torch.testing.assert_close(
            got[k].double(), torch.tensor(brute_force_shapley(game, 6), dtype=torch.float64), rtol=0, atol=2e-6
        )


def test_kernel_shap_efficiency_holds_with_sampled_coalitions_and_probabilities(tiny_model):
    model, x = tiny_model("student", 0), shape_images(3)
    seg = slic_segments(x)
    assert int(seg.amax()) + 1 >= 8  # 2^M >> budget: coalitions are sampled
    t = torch.tensor([0, 1, 2])
    maps = KernelSHAP(model, {"n_samples": 60, "baseline": "blur"}).explain(x, t, segments=seg).maps
    with torch.no_grad():
        p = model.eval()(torch.cat([x, baseline_images(x, "blur", 3.0)])).softmax(dim=1)
    delta = p[:3].gather(1, t[:, None])[:, 0] - p[3:].gather(1, t[:, None])[:, 0]
    for k in range(3):
        phi = [maps[k][seg[k] == s][0] for s in range(int(seg[k].max()) + 1)]
        assert float(sum(phi)) == pytest.approx(float(delta[k]), abs=1e-6)
    assert maps.abs().sum() > 0


def test_shap_design_enumeration_has_the_shapley_kernel_weights():
    # 2^5 - 2 = 30 coalitions: every one drawn once, weight proportional to (M-1) / (C(M,|z|) |z| (M-|z|))
    z, w = shap_design(5, 30, seed=0)
    assert len(z) == 30 and len({tuple(r.tolist()) for r in z}) == 30
    size = z.sum(dim=1)
    kernel = torch.tensor([4 / (math.comb(5, int(s)) * int(s) * (5 - int(s))) for s in size], dtype=torch.float64)
    torch.testing.assert_close(w, kernel / kernel.sum())
    # a smaller budget: sizes 1 and 4 (the heaviest) are enumerated, sizes 2/3 sampled in complementary pairs
    z, w = shap_design(5, 20, seed=0)
    assert len(z) == 20 and w.sum().item() == pytest.approx(1.0)
    assert sorted(z[:10].sum(dim=1).tolist()) == [1] * 5 + [4] * 5
    assert torch.equal(z[10::2], ~z[11::2])
    assert torch.equal(shap_design(5, 20, seed=0)[0], z) and not torch.equal(shap_design(5, 20, seed=1)[0], z)


# ----------------------------------------------------------------------------------------------
# LIME known answers


def test_lime_without_ridge_recovers_an_additive_model_exactly():
    x = torch.rand(3, 1, 8, 12)
    seg = grid_segments(3)
    maps = LIME(SegmentGame(additive), {"n_samples": 100, "alpha": 0.0, "baseline": "zero", "output": "logit"}).explain(
        x, torch.zeros(3, dtype=torch.long), segments=seg
    )
    expected = W6 * segment_means(x, seg, 6)
    torch.testing.assert_close(per_segment(maps.maps, seg, 6), expected, rtol=0, atol=2e-6)


def test_lime_equals_sklearn_weighted_ridge_with_lime_image_kernel():
    from sklearn.linear_model import Ridge
    from sklearn.metrics import pairwise_distances

    x = torch.rand(2, 1, 8, 12)
    seg = grid_segments(2)
    n = 80
    maps = LIME(SegmentGame(additive), {"n_samples": n, "baseline": "zero", "output": "logit", "seed": 3}).explain(
        x, torch.zeros(2, dtype=torch.long), segments=seg
    )
    got = per_segment(maps.maps, seg, 6)
    z, w = lime_design(6, n - 1, seed=3, kernel_width=0.25)
    z = np.vstack([np.ones((1, 6)), z.numpy().astype(float)])  # lime_image's row 0 is the original
    # lime_image: distances = pairwise_distances(data, data[0], "cosine"); kernel sqrt(exp(-d^2 / 0.25^2))
    d = pairwise_distances(z, z[:1], metric="cosine").ravel()
    weights = np.sqrt(np.exp(-(d**2) / 0.25**2))
    np.testing.assert_allclose(np.concatenate([[1.0], w.numpy()]), weights, rtol=1e-12)
    means = segment_means(x, seg, 6).double().numpy()
    for k in range(2):
        y = z @ (W6.double().numpy() * means[k])
        ref = Ridge(alpha=1.0, fit_intercept=True).fit(z, y, sample_weight=weights).coef_
        np.testing.assert_allclose(got[k].double().numpy(), ref, rtol=0, atol=2e-6)
        # ridge shrinks, but the coefficients keep the order of w_s * mean_s
        assert np.argsort(got[k].numpy()).tolist() == np.argsort(W6.numpy() * means[k]).tolist()
        # and the penalty shrinks the coefficient vector (not each coefficient) below the exact one
        assert np.linalg.norm(got[k].numpy()) < 0.95 * np.linalg.norm(W6.numpy() * means[k])


def test_weighted_ridge_zero_pads_missing_features():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(2, 30, 4, generator=g) > 0.5
    y = torch.randn(2, 30, generator=g, dtype=torch.float64)
    w = torch.rand(2, 30, generator=g, dtype=torch.float64)
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    coef, _ = solve_weighted_ridge(z, w, y, valid, alpha=0.5)
    alone, _ = solve_weighted_ridge(z[1:, :, :3], w[1:], y[1:], valid[1:, :3], alpha=0.5)
    assert coef[1, 3] == 0
    torch.testing.assert_close(coef[1, :3], alone[0])


# ----------------------------------------------------------------------------------------------
# evidence, batching, budget, contract


class BoxModel(nn.Module):
    """Logits (s, -s), s = 4 * mean of the 5x5 box at rows/cols 3..7: nothing else matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 4 * x[:, 0, 3:8, 3:8].mean(dim=(1, 2))
        return torch.stack([s, -s], dim=1)


@pytest.mark.parametrize("cls", [KernelSHAP, LIME])
def test_mass_lies_in_the_evidence_box(cls):
    x = shape_images(3)
    att = cls(BoxModel(), {"n_samples": 100}).explain(x, torch.zeros(3, dtype=torch.long))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[3:8, 3:8] = True
    for m in att.maps:
        assert m[inside].abs().sum() > 0.9 * m.abs().sum()
        assert m[inside].min() > 0  # the box supports class 0


@pytest.mark.parametrize("cls", [KernelSHAP, LIME])
def test_batched_equals_one_image_at_a_time(cls, tiny_model):
    model, x = tiny_model("student", 0), shape_images(5, seed=1)
    x[1:3] = x[1:3].flip(-1)  # different segmentations in the batch (different M)
    seg = slic_segments(x)
    assert len(set((seg.flatten(1).amax(1) + 1).tolist())) > 1
    t = torch.tensor([0, 1, 2, 0, 1])
    params = {"n_samples": 50, "output": "logit"}
    whole = cls(model, {**params, "batch_size": 2, "internal_batch_size": 7}).explain(x, t).maps
    single = torch.cat([cls(model, params).explain(x[i : i + 1], t[i : i + 1]).maps for i in range(5)])
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-6)
    assert whole.abs().sum() > 0


class Counter(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen, self.largest = inner, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        self.largest = max(self.largest, len(x))
        return self.inner(x)


@pytest.mark.parametrize("cls", [KernelSHAP, LIME])
def test_budget_is_model_evaluations_per_image(cls, tiny_model):
    x = shape_images(4)
    seg = slic_segments(x)
    assert int(seg.amax()) + 1 >= 8
    model = Counter(tiny_model("student", 0))
    cls(model, {"n_samples": 40, "internal_batch_size": 64}).explain(x, None, segments=seg)
    assert model.seen == 4 * 40 and model.largest == 64
    # full enumeration needs fewer: M = 6 -> 2^6 = 64 evaluations (incl. image and baseline), not 100
    if cls is KernelSHAP:
        model = Counter(SegmentGame(additive))
        cls(model, {"n_samples": 100}).explain(torch.rand(2, 1, 8, 12), None, segments=grid_segments(2))
        assert model.seen == 2 * 64


@pytest.mark.parametrize("name", ["kernel_shap", "lime"])
def test_contract_mode_grads_targets(name, tiny_model):
    model = tiny_model("student", 0)
    model.train()
    model.blocks[0].eval()
    flags = [m.training for m in model.modules()]
    x = shape_images(3)
    with build_explainer(name, model, {"n_samples": 30, "superpixel": {"n_segments": 10}}) as e:
        att = e.explain(x, None)
    check_maps(att.maps, (16, 16))
    assert att.method == name and att.maps.shape == (3, 16, 16)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        pred = model.eval()(x).argmax(dim=1)
    torch.testing.assert_close(
        att.maps,
        build_explainer(name, model, {"n_samples": 30, "superpixel": {"n_segments": 10}}).explain(x, pred).maps,
    )


def test_baselines():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(2, 3, 10, 12)
    torch.testing.assert_close(baseline_images(x, "zero"), torch.zeros_like(x))
    torch.testing.assert_close(baseline_images(x, "mean")[:, :, 4, 7], x.mean(dim=(2, 3)))
    ref = np.stack([[gaussian_filter(c, 1.5, mode="nearest", truncate=3.0) for c in img] for img in x.double().numpy()])
    np.testing.assert_allclose(baseline_images(x, "blur", 1.5).numpy(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("kernel_shap", {"n_samples": 2}, "n_samples must be >= 3"),
        ("lime", {"n_samples": 1}, "n_samples must be >= 2"),
        ("lime", {"baseline": "noise"}, "allowed values: 'zero', 'mean', 'blur'"),
        ("kernel_shap", {"output": "log"}, "allowed values: 'prob', 'logit'"),
        ("kernel_shap", {"internal_batch_size": 0}, "internal_batch_size must be >= 1"),
        ("lime", {"batch_size": 0}, "batch_size must be >= 1"),
        ("lime", {"kernel_width": 0.0}, "kernel_width must be > 0"),
        ("lime", {"alpha": -1.0}, "alpha"),
        ("kernel_shap", {"blur_sigma": 0.0}, "blur_sigma"),
        ("kernel_shap", {"superpixel": {"n_segments": 0}}, "n_segments must be >= 1"),
        ("kernel_shap", {"alpha": 1.0}, "unknown key"),
    ],
)
def test_params_are_validated(name, params, message, tiny_model):
    with pytest.raises(ConfigError, match=message):
        build_explainer(name, tiny_model("student", 0), params)


def test_bad_segments_and_outputs_are_rejected():
    x = torch.rand(2, 1, 8, 12)
    with pytest.raises(ValueError, match=r"segments must be integer labels of shape \(2, 8, 12\)"):
        KernelSHAP(SegmentGame(additive)).explain(x, None, segments=grid_segments(2)[:, :4])
    with pytest.raises(ValueError, match=r"logits of shape \(N, classes\)"):
        LIME(nn.Identity()).explain(x, None, segments=grid_segments(2))


@pytest.mark.parametrize("name", ["kernel_shap", "lime"])
def test_superpixel_form_of_a_superpixel_explainer_changes_nothing(name, tiny_model):
    # its maps already hold one value per superpixel: `+superpixel` must read it once, not sum it
    # over the superpixel's area (which would rank large superpixels first)
    images = shape_images(3)
    model = tiny_model("student", 0)
    params = {"n_samples": 64, "seed": 0}
    with build_explainer(name, model, params) as ex:
        plain = ex.explain(images, torch.tensor([0, 1, 0])).maps
    with build_explainer(name + "+superpixel", model, params) as ex:
        formed = ex.explain(images, torch.tensor([0, 1, 0])).maps
    torch.testing.assert_close(formed, plain, rtol=1e-5, atol=1e-7)
    assert ex.map_form == "superpixel" and build_explainer(name, model, params).map_form == "superpixel"
