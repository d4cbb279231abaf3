"""Occlusion: hand-computed maps of linear models (both backends), captum agreement, evidence region, contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xkd.config import ConfigError
from xkd.explain.base import build_explainer, check_maps
from xkd.explain.occlusion import Occlusion, window_masks

BACKENDS = ["captum", "xkd"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    """logits = (scale * sum(w * x), 0): one known weight per pixel (shared by the channels)."""

    def __init__(self, w: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.w, self.scale = w, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale * (x * self.w).flatten(1).sum(dim=1, keepdim=True)
        return torch.cat([s, torch.zeros_like(s)], dim=1)


X33 = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
ZERO = torch.tensor([0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_overlapping_windows_give_block_sums(backend):
    x = torch.tensor([[1.0, 2.0, 0.0, 1.0], [3.0, 2.0, 1.0, 0.0], [-1.0, 0.0, -2.0, -1.0], [0.0, -1.0, 0.0, -1.0]])
    w = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # blocks of x * w: top-left 1+2+3+2 = 8, top-right 2*(0+1+1+0) = 4, bottom-left -2, bottom-right -4
    expected = torch.tensor([[8.0, 4.0], [-2.0, -4.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    params = {"window": 2, "stride": 2, "output": "logit", "backend": backend}
    maps = Occlusion(Linear(w), params).explain(x.view(1, 1, 4, 4), ZERO).maps
    torch.testing.assert_close(maps[0], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_windows_average_the_drops(backend):
    # 2x2 windows, stride 1 on 3x3: window sums TL 12, TR 16, BL 24, BR 28; each pixel = mean of its windows
    expected = torch.tensor([[12.0, 14.0, 16.0], [18.0, 20.0, 22.0], [24.0, 26.0, 28.0]])
    params = {"window": 2, "stride": 1, "output": "logit", "backend": backend}
    maps = Occlusion(Linear(torch.ones(3, 3)), params).explain(X33, ZERO).maps
    torch.testing.assert_close(maps[0], expected)
    # "mean" baseline (5): drops are window sums of x - 5 = -8, -4, 4, 8
    maps = Occlusion(Linear(torch.ones(3, 3)), {**params, "baseline": "mean"}).explain(X33, ZERO).maps
    torch.testing.assert_close(maps[0], expected - 20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_window_is_clipped_at_the_border(backend):
    # width 5, window 2, stride 2: windows start at 0, 2, 4 (the last covers one column) as in captum
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 1, 1, 5)
    params = {"window": [1, 2], "stride": [1, 2], "output": "logit", "backend": backend}
    maps = Occlusion(Linear(torch.ones(1, 5)), params).explain(x, ZERO).maps
    torch.testing.assert_close(maps[0, 0], torch.tensor([3.0, 3.0, 7.0, 7.0, 5.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prob_output_is_the_drop_in_softmax_probability(backend):
    # logits (sum(x)/10, 0): p0 = sigmoid(sum/10); occluding window k removes its sum s_k
    model = Linear(torch.ones(3, 3), scale=0.1)
    drops = torch.sigmoid(torch.tensor(4.5)) - torch.sigmoid(torch.tensor([4.5 - 1.2, 4.5 - 1.6, 4.5 - 2.4, 4.5 - 2.8]))
    maps = Occlusion(model, {"window": 2, "stride": 1, "backend": backend}).explain(X33, ZERO).maps[0]
    assert maps[0, 0] == pytest.approx(float(drops[0]), rel=1e-5)
    assert maps[2, 2] == pytest.approx(float(drops[3]), rel=1e-5)
    assert maps[1, 1] == pytest.approx(float(drops.mean()), rel=1e-5)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 6 * 7, 5),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("window", "stride", "baseline"), [(4, 2, "zero"), ([3, 5], [2, 3], "blur"), (2, 1, "uniform")]
)
def test_backends_agree(window, stride, baseline):
    model, x = small_cnn(), torch.rand(6, 3, 12, 14)
    t = torch.randint(0, 5, (6,))
    params = {"window": window, "stride": stride, "baseline": baseline, "sigma": 1.5, "batch_size": 4}
    own = Occlusion(model, {**params, "backend": "xkd", "internal_batch_size": 37}).explain(x, t).maps
    ref = Occlusion(model, {**params, "backend": "captum"}).explain(x, t).maps
    assert ref.abs().max() > 0
    assert (own - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_only_the_xkd_backend_builds_the_window_masks(monkeypatch):
    # the dense masks take (positions x H x W) floats: 2.3 GiB at 224 px, window 4, stride 2
    import xkd.explain.occlusion as O

    built = []
    monkeypatch.setattr(O, "window_masks", lambda *a: built.append(a) or window_masks(*a))
    model, x = small_cnn(), torch.rand(2, 3, 12, 14)
    Occlusion(model, {"window": 4, "stride": 2, "backend": "captum"}).explain(x, None)
    assert built == []
    Occlusion(model, {"window": 4, "stride": 2, "backend": "xkd"}).explain(x, None)
    assert built == [((12, 14), (4, 4), (2, 2))]


R1 = (slice(2, 7), slice(2, 7))  # a bright square: the evidence of class 0


def test_map_points_at_the_evidence_region():
    # logit 0 = mean of ReLU(3x3 blur of x); logit 1 = 0: only bright pixels raise class 0
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1 / 9)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[4].weight.copy_(torch.tensor([[1.0], [0.0]]))
        model[4].bias.zero_()
    x = (torch.rand(3, 1, 16, 18) - 0.5) * 0.1  # zero-mean clutter: blurred, it is mostly cut by the ReLU
    x[:, :, R1[0], R1[1]] = 1.0
    maps = Occlusion(model, {"window": 3, "stride": 1, "output": "logit"}).explain(x, torch.zeros(3, dtype=torch.long))
    inside = torch.zeros(16, 18, dtype=torch.bool)
    inside[R1] = True
    near = torch.zeros(16, 18, dtype=torch.bool)  # the square grown by 2 px: 3x3 windows meet a 3x3 blur
    near[0:9, 0:9] = True
    for m in maps.maps:
        i, j = divmod(int(m.argmax()), 18)
        assert inside[i, j]
        # measured 0.57 inside the 5x5 square (its 9x9 surround shares the drops), 0.98 near it
        assert m[inside].abs().sum() > 0.5 * m.abs().sum()
        assert m[near].abs().sum() > 0.95 * m.abs().sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_contract_mode_batching_predicted_class(backend):
    model, x = small_cnn(), torch.rand(5, 3, 12, 14)
    model.train()
    model[0].eval()
    flags = [m.training for m in model.modules()]
    att = build_explainer("occlusion", model, {"backend": backend, "batch_size": 2}).explain(x, None)
    assert att.method == "occlusion" and att.layer is None
    check_maps(att.maps, (12, 14))
    assert [m.training for m in model.modules()] == flags and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        pred = model.eval()(x).argmax(dim=1)
    whole = build_explainer("occlusion", model, {"backend": backend}).explain(x, pred).maps
    torch.testing.assert_close(att.maps, whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"window": 2, "stride": 3}, "stride 3 must not exceed window 2"),
        ({"window": [2, 2, 2]}, "window must be an integer or \\[height, width\\]"),
        ({"output": "loss"}, "allowed values: 'prob', 'logit'"),
        ({"baseline": "noise"}, "allowed values"),
        ({"window": 0}, "window and stride must be >= 1"),
    ],
)
def test_params_are_validated(params, message):
    with pytest.raises(ConfigError, match=message):
        build_explainer("occlusion", small_cnn(), params)


def test_window_larger_than_image_is_rejected():
    with pytest.raises(ValueError, match=r"window \[20, 20\] is larger than the images \[12, 14\]"):
        Occlusion(small_cnn(), {"window": 20, "stride": 1}).explain(torch.rand(1, 3, 12, 14), None)
