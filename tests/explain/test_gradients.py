"""Integrated Gradients, GradientSHAP and DeepSHAP: exact answers on linear models, completeness,
additivity, agreement with captum, seeding, and the explainer contract."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from xkd.config import ConfigError
from xkd.explain.base import build_explainer, check_maps
from xkd.explain.gradients import DeepSHAP, GradientSHAP, IntegratedGradients, gaussian_blur, make_baselines

pytestmark = pytest.mark.usefixtures("one_thread")


BOX = (slice(2, 6), slice(3, 8))  # the only pixels the linear model looks at


def linear_box_model(seed: int = 0, classes: int = 3) -> tuple[nn.Module, torch.Tensor]:
    """logit_c = sum(W_c * x) + b_c over 2x10x12 images, W_c zero outside BOX. Returns (model, W (K, 2, 10, 12))."""
    torch.manual_seed(seed)
    w = torch.zeros(classes, 2, 10, 12)
    w[:, :, BOX[0], BOX[1]] = torch.randn(classes, 2, 4, 5)
    lin = nn.Linear(2 * 10 * 12, classes)
    with torch.no_grad():
        lin.weight.copy_(w.flatten(1))
        lin.bias.copy_(torch.tensor([0.5, -1.0, 2.0])[:classes])
    return nn.Sequential(nn.Flatten(), lin), w


def relu_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 6, 3),
    )  # fmt: skip


def chosen(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).gather(1, t[:, None])[:, 0]


def inside_fraction(maps: torch.Tensor) -> float:
    inside = maps[:, BOX[0], BOX[1]].abs().sum()
    return float(inside / maps.abs().sum())


# --------------------------------------------------------------------------- integrated gradients


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
def test_ig_on_a_linear_model_is_x_times_w(method):
    # constant gradient W_c: IG with a zero baseline is x * W_c exactly, summed over the 2 channels
    # (riemann_trapezoid: captum's weights sum to (n-1)/n; xkd rescales, this catches a regression)
    model, w = linear_box_model()
    x, t = torch.randn(4, 2, 10, 12), torch.tensor([0, 1, 2, 1])
    maps = IntegratedGradients(model, {"n_steps": 8, "method": method}).explain(x, t).maps
    torch.testing.assert_close(maps, (x * w[t]).sum(dim=1), rtol=1e-5, atol=1e-6)
    assert inside_fraction(maps) > 0.9 and maps[:, :2].abs().max() == 0
    assert (maps < 0).any()  # signed, no abs


@pytest.mark.parametrize("baseline", ["zero", "mean", "blur", "uniform"])
def test_ig_completeness_on_a_relu_net(baseline):
    # sum_i IG_i = F(x) - F(x') (Sundararajan et al., Prop. 1), within 1e-2 relative to the largest gap;
    # the ReLU kinks make the integrand piecewise constant: 64 Gauss-Legendre steps leave up to 4 %
    # (measured), 256 steps <= 1.2 % of the smallest gap
    model, x, t = relu_net(), torch.rand(3, 2, 10, 12), torch.tensor([0, 1, 2])
    params = {
        "baseline": baseline,
        "sigma": 2.0,
        "n_steps": 256,
        "batch_size": 2,
        "internal_batch_size": None,
        "seed": 3,
    }
    maps = IntegratedGradients(model, params).explain(x, t).maps
    base = torch.cat([make_baselines(x[:2], baseline, 2.0, 3, 1, 0), make_baselines(x[2:], baseline, 2.0, 3, 1, 2)])
    expected = chosen(model, x, t) - chosen(model, base[:, 0], t)
    assert expected.abs().min() > 1e-3
    torch.testing.assert_close(maps.sum(dim=(1, 2)), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


def test_baselines_by_name():
    x = torch.rand(2, 3, 9, 11) * 4 - 1
    torch.testing.assert_close(make_baselines(x, "zero")[:, 0], torch.zeros_like(x))
    mean = make_baselines(x, "mean")[:, 0]
    torch.testing.assert_close(mean[:, :, 4, 5], x.mean(dim=(2, 3)))
    assert mean.amax(dim=(2, 3)).sub(mean.amin(dim=(2, 3))).abs().max() == 0
    # a constant image is a fixed point of the (normalised, replicate-padded) blur; a delta spreads as a Gaussian
    torch.testing.assert_close(gaussian_blur(torch.full((1, 1, 7, 7), 2.5), 3.0), torch.full((1, 1, 7, 7), 2.5))
    delta = torch.zeros(1, 1, 21, 21)
    delta[0, 0, 10, 10] = 1.0
    g = gaussian_blur(delta, 1.5)[0, 0]
    assert g.sum() == pytest.approx(1.0, abs=1e-5)
    assert float(g[10, 11] / g[10, 10]) == pytest.approx(torch.exp(torch.tensor(-1 / (2 * 1.5**2))).item(), rel=1e-5)
    u = make_baselines(x, "uniform", seed=1, count=5)
    assert u.shape == (2, 5, 3, 9, 11)
    lo, hi = x.amin(dim=(2, 3)), x.amax(dim=(2, 3))
    assert (u.amin(dim=(1, 3, 4)) >= lo).all() and (u.amax(dim=(1, 3, 4)) <= hi).all()
    torch.testing.assert_close(u, make_baselines(x, "uniform", seed=1, count=5))
    assert not torch.equal(u, make_baselines(x, "uniform", seed=2, count=5))
    # per-image generators: image 1 alone (start=1) gets the same noise as in the batch
    torch.testing.assert_close(u[1:], make_baselines(x[1:], "uniform", seed=1, count=5, start=1))


# --------------------------------------------------------------------------- gradient shap


def test_gradient_shap_on_a_linear_model():
    model, w = linear_box_model()
    x, t = torch.randn(5, 2, 10, 12), torch.tensor([0, 1, 2, 1, 0])
    # zero baseline, no noise: (x - 0) * W for every draw, whatever the alphas
    maps = GradientSHAP(model, {"baseline": "zero", "n_samples": 7}).explain(x, t).maps
    torch.testing.assert_close(maps, (x * w[t]).sum(dim=1), rtol=1e-5, atol=1e-6)
    # one baseline per image drawn from the batch: sum = F(x_i) - F(x_j) for the drawn image j, exactly
    maps = GradientSHAP(model, {"baseline": "batch", "n_baselines": 1, "n_samples": 3}).explain(x, t).maps
    f = model(x).detach()
    for i in range(5):
        gaps = f[i, t[i]] - f[:, t[i]]
        assert (gaps - maps[i].sum()).abs().min() < 1e-4
        assert (x[i] * w[t[i]]).sum() != pytest.approx(float(maps[i].sum()))  # the baseline is not zero
    assert inside_fraction(maps) > 0.9


def test_gradient_shap_expectation_is_integrated_gradients():
    # zero baseline, stdevs 0: expected gradients = Monte-Carlo IG over alpha ~ U(0, 1).
    # 4000 draws: measured max error 0.7-2.2 % of the largest |IG| and 0.1-0.9 % on the sum (seeds 0-3)
    model, x, t = relu_net(), torch.rand(1, 2, 10, 12), torch.tensor([1])
    eg = GradientSHAP(model, {"baseline": "zero", "n_samples": 4000, "internal_batch_size": 2000}).explain(x, t)
    ig = IntegratedGradients(model, {"n_steps": 100}).explain(x, t)
    scale = ig.maps.abs().max()
    assert (eg.maps - ig.maps).abs().max() < 0.05 * scale
    assert eg.maps.sum() == pytest.approx(float(ig.maps.sum()), rel=0.02)


def test_gradient_shap_is_seeded_and_independent_of_batching():
    model, x, t = relu_net(), torch.rand(5, 2, 10, 12), torch.tensor([0, 1, 2, 0, 1])
    params = {"baseline": "uniform", "n_baselines": 4, "n_samples": 6, "stdevs": 0.1, "seed": 5}
    a = GradientSHAP(model, params).explain(x, t).maps
    b = GradientSHAP(model, {**params, "batch_size": 2, "internal_batch_size": 5}).explain(x, t).maps
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    c = GradientSHAP(model, {**params, "seed": 6}).explain(x, t).maps
    assert (a - c).abs().max() > 1e-3 * a.abs().max()
    state = torch.get_rng_state()
    GradientSHAP(model, params).explain(x, t)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is untouched


# --------------------------------------------------------------------------- deep shap


def test_deep_shap_additivity_and_captum_deeplift_shap():
    from captum.attr import DeepLiftShap

    model, x = relu_net(), torch.rand(4, 2, 10, 12)
    model.train()
    att = DeepSHAP(model, {"background": "batch", "n_background": 3, "seed": 1}).explain(x, None)
    assert model.training and model[1].inplace  # the user's model is untouched (shap ran on a copy)
    with torch.no_grad():
        out = model.eval()(x)
    t = out.argmax(dim=1)
    pick = torch.randperm(4, generator=torch.Generator().manual_seed(1))[:3]
    background = x[pick]
    # DeepSHAP's guarantee for ReLU nets: sum phi = F(x) - E_b[F(b)]
    expected = out.gather(1, t[:, None])[:, 0] - model(background).detach().mean(0)[t]
    torch.testing.assert_close(att.maps.sum(dim=(1, 2)), expected, rtol=1e-4, atol=1e-5)
    # the same rescale rule in captum (non-inplace copy, as captum also needs)
    clean = relu_net()
    clean[1].inplace = False
    ref = DeepLiftShap(clean.eval()).attribute(x, baselines=background, target=t).sum(dim=1)
    torch.testing.assert_close(att.maps, ref.detach(), rtol=1e-4, atol=1e-6)
    check_maps(att.maps, (10, 12))


def test_deep_shap_without_shap_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "shap", None)  # makes `import shap` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'xkd\[shap\]'"):
        DeepSHAP(relu_net()).explain(torch.rand(1, 2, 10, 12), None)


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("integrated_gradients", {"n_steps": 4}),
        ("gradient_shap", {"n_samples": 3}),
    ],
)
def test_contract_mode_grads_predicted_class(name, params):
    model, x = relu_net(), torch.rand(3, 2, 10, 12)
    model.train()
    model[0].eval()
    flags = [m.training for m in model.modules()]
    att = build_explainer(name, model, params).explain(x, None)
    assert att.method == name and att.layer is None
    check_maps(att.maps, (10, 12))
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        pred = model.eval()(x).argmax(dim=1)
    torch.testing.assert_close(att.maps, build_explainer(name, model, params).explain(x, pred).maps)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("integrated_gradients", {"baseline": "gaussian"}, "allowed values: 'zero', 'mean', 'blur', 'uniform'"),
        ("integrated_gradients", {"baseline": "batch"}, "allowed values"),
        ("integrated_gradients", {"batch_size": 16, "internal_batch_size": 20}, "internal_batch_size.*>= 2 \\* batch"),
        ("integrated_gradients", {"n_steps": 1}, "n_steps"),
        ("gradient_shap", {"stdevs": -1.0}, "stdevs"),
        ("gradient_shap", {"n_samples": 0}, "n_samples"),
        ("deep_shap", {"background": "blur"}, "allowed values: 'zero', 'batch'"),
        ("deep_shap", {"shap": 1}, "unknown key"),
    ],
)
def test_params_are_validated(name, params, message):
    with pytest.raises(ConfigError, match=message):
        build_explainer(name, relu_net(), params)
