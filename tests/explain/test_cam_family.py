"""Grad-CAM++ and LayerCAM: hand-computed values, pytorch-grad-cam numbers, evidence region, contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAMPlusPlus as PGCPlusPlus
from pytorch_grad_cam import LayerCAM as PGCLayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from xkd.config import ConfigError
from xkd.explain.base import Attribution, build_explainer, check_maps, normalize_maps
from xkd.explain.gradcam import GradCAMPlusPlus, LayerCAM
from xkd.models import LayerNotFoundError

CAMS = [GradCAMPlusPlus, LayerCAM]


pytestmark = pytest.mark.usefixtures("one_thread")


# helpers as in test_gradcam.py (pytest's importlib mode cannot import a sibling test module)
R1 = (slice(2, 7), slice(2, 7))  # class 0 evidence: a bright square
R2 = (slice(9, 14), slice(11, 16))  # class 1 evidence: a dark square


class TwoObjects(nn.Module):
    """Channel 0 sees bright pixels, channel 1 dark ones (3x3 blur, stride 2, ReLU); logit c = mean of channel c."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.stack([torch.full((1, 3, 3), 1 / 9), torch.full((1, 3, 3), -1 / 9)]))
            self.features[0].bias.zero_()
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=1, keepdim=True)
        return torch.cat([m, -m], dim=1)


def two_object_images(n: int = 4, width: int = 18) -> torch.Tensor:
    x = torch.rand(n, 1, 16, width) * 0.1
    x[:, :, R1[0], R1[1]] = 1.0
    x[:, :, R2[0], R2[1]] = -1.0
    return x


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


# bilinear 2 -> 4 with align_corners=False: output rows sample input rows 0, 0.25, 0.75, 1
UP = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])


def patch_sum_model() -> nn.Module:
    # one 2x2/stride-2 conv summing each patch (A is 2x2), logits = (mean A, -mean A): dy0/dA = 1/4, dy1/dA = -1/4
    conv = nn.Conv2d(1, 1, 2, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    return nn.Sequential(conv, nn.Flatten(), Mean())


X = torch.tensor([[1.0, 2.0, 0.0, 1.0], [3.0, 2.0, 1.0, 0.0], [-1.0, 0.0, -2.0, -1.0], [0.0, -1.0, 0.0, -1.0]])
A = torch.tensor([[8.0, 2.0], [-2.0, -4.0]])  # patch sums of X; sum_ij A = 4


def test_grad_cam_pp_hand_computed():
    # class 0: g = 1/4 everywhere, alpha = g^2 / (2 g^2 + 4 g^3) = 1 / (2 + 4/4) = 1/3,
    # w = sum_ij alpha relu(g) = 4 * 1/3 * 1/4 = 1/3, cam = ReLU(A / 3).
    # class 1: g = -1/4, relu(g) = 0 -> w = 0 -> an all-zero map.
    with GradCAMPlusPlus(patch_sum_model(), {"layer": "0"}) as ex:
        maps = ex.explain(X.view(1, 1, 4, 4).repeat(2, 1, 1, 1), torch.tensor([0, 1])).maps
    torch.testing.assert_close(maps[0], UP @ torch.relu(A / 3) @ UP.T)
    assert maps[0, 0, 0] == pytest.approx(8 / 3) and maps[1].abs().max() == 0


def test_layer_cam_hand_computed():
    # class 0: relu(g) * A summed over the one channel = A / 4; class 1: relu(-1/4) = 0 -> zero map.
    # relu=False keeps the negative evidence A / 4 < 0 of the lower patches.
    model, x = patch_sum_model(), X.view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    maps = LayerCAM(model, {"layer": "0"}).explain(x, torch.tensor([0, 1])).maps
    torch.testing.assert_close(maps[0], UP @ torch.relu(A / 4) @ UP.T)
    assert maps[1].abs().max() == 0
    raw = LayerCAM(model, {"layer": "0", "relu": False}).explain(x[:1], torch.tensor([0])).maps
    torch.testing.assert_close(raw[0], UP @ (A / 4) @ UP.T)


def full_res_model(scale: float) -> nn.Module:
    """Stride-1 convs: the explained layer has the input's resolution, so pytorch-grad-cam's OpenCV
    resize is the identity and the maps are comparable value by value."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        model[6].weight.mul_(scale)
    return model


def pytorch_grad_cam(cls: type, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    cam = cls(model=model, target_layers=[model[3]])
    try:
        return torch.from_numpy(np.asarray(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])))
    finally:
        cam.activations_and_grads.release()


@pytest.mark.parametrize(("ours", "theirs"), [(GradCAMPlusPlus, PGCPlusPlus), (LayerCAM, PGCLayerCAM)])
def test_matches_pytorch_grad_cam(ours, theirs):
    # scale 300: gradients ~1e-1, so pytorch-grad-cam's eps = 1e-6 in the Grad-CAM++ denominator is
    # negligible (measured agreement 4e-6 after its min-max normalisation; 1e-7 for LayerCAM)
    model, x, t = full_res_model(300.0), torch.rand(5, 1, 10, 12), torch.tensor([0, 1, 2, 0, 1])
    own = ours(model, {"layer": "3"}).explain(x, t).maps
    ref = pytorch_grad_cam(theirs, model, x, t)
    assert own.abs().amax(dim=(1, 2)).min() > 0
    assert (normalize_maps(own) - ref).abs().max() < 2e-5


def test_grad_cam_pp_differs_from_pytorch_grad_cam_only_by_its_eps():
    # unscaled: gradients ~1e-3, g^2 ~ 1e-6 ~ eps, so pytorch-grad-cam's maps move by ~0.1 (measured 0.10);
    # putting its eps (and its alpha = 0 where g = 0) into the formula reproduces it exactly
    class WithEps(GradCAMPlusPlus):
        def channel_weights(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            g2 = g**2
            alpha = torch.where(g != 0, g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + 1e-6), 0.0)
            return (alpha * torch.relu(g)).sum(dim=(2, 3), keepdim=True)

    model, x, t = full_res_model(1.0), torch.rand(5, 1, 10, 12), torch.tensor([0, 1, 2, 0, 1])
    ref = pytorch_grad_cam(PGCPlusPlus, model, x, t)
    assert (normalize_maps(WithEps(model, {"layer": "3"}).explain(x, t).maps) - ref).abs().max() < 2e-5
    assert (normalize_maps(GradCAMPlusPlus(model, {"layer": "3"}).explain(x, t).maps) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("cls", CAMS)
def test_map_points_at_the_known_evidence_region(cls):
    model, x = TwoObjects(), two_object_images(width=18)
    with cls(model, {"layer": "features.1"}) as ex:
        for target, (rows, cols) in [(0, R1), (1, R2)]:
            maps = ex.explain(x, torch.full((len(x),), target)).maps
            for m in maps:
                i, j = divmod(int(m.argmax()), 18)
                assert rows.start <= i < rows.stop and cols.start <= j < cols.stop
                inside = torch.zeros_like(m, dtype=torch.bool)
                inside[rows, cols] = True
                assert m[inside].mean() > 5 * m[~inside].mean()


@pytest.mark.parametrize("cls", CAMS)
def test_batched_equals_one_by_one(cls, tiny_model):
    model, x = tiny_model("teacher", 0), torch.rand(5, 1, 16, 16)
    t = torch.randint(0, 3, (5,))
    batched = cls(model, {"batch_size": 2, "relu": False}).explain(x, t).maps
    single = torch.cat([cls(model, {"relu": False}).explain(x[i : i + 1], t[i : i + 1]).maps for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-7)
    assert batched.abs().max() > 0


@pytest.mark.parametrize("name", ["grad_cam_pp", "layer_cam"])
def test_contract_mode_grads_hooks_and_predicted_class(name, tiny_model):
    model = tiny_model("teacher", 0)
    model.train()
    model.layer1.eval()
    flags = [m.training for m in model.modules()]
    x = torch.rand(4, 1, 12, 20)
    with build_explainer(name, model, {"relu": False}) as ex:
        att = ex.explain(x, None)
        assert all_hooks(model) == 0
    assert isinstance(att, Attribution) and att.method == name and att.layer == "layer3"
    check_maps(att.maps, (12, 20))
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        pred = model.eval()(x).argmax(dim=1)
    torch.testing.assert_close(att.maps, build_explainer(name, model, {"relu": False}).explain(x, pred).maps)


@pytest.mark.parametrize("cls", CAMS)
def test_unknown_layer_lists_candidates(cls, tiny_model):
    with pytest.raises(LayerNotFoundError, match=r"layer 'blocks\.9'.*blocks\.0\.0"):
        cls(tiny_model("student", 0), {"layer": "blocks.9"})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"backend": "captum"}, "unknown key 'params.backend'"),
        ({"layer": ""}, "layer"),
    ],
)
@pytest.mark.parametrize("name", ["grad_cam_pp", "layer_cam"])
def test_params_are_validated(name, params, message, tiny_model):
    with pytest.raises(ConfigError, match=message):
        build_explainer(name, tiny_model("student", 0), params)


class SideBranch(nn.Module):
    """A convolution that runs but does not feed the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.side, self.fc = nn.Conv2d(1, 2, 3), nn.Conv2d(1, 2, 3), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.side(x)
        return self.fc(self.main(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["grad_cam", "grad_cam_pp", "layer_cam"])
def test_a_layer_that_does_not_feed_the_logits_is_one_clear_error(name):
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="layer 'side' does not feed the logits of SideBranch"):
        build_explainer(name, SideBranch(), {"layer": "side"}).explain(x, None)
    assert build_explainer(name, SideBranch(), {"layer": "main"}).explain(x, None).maps.shape == (2, 8, 8)


@pytest.mark.parametrize("name", ["grad_cam", "grad_cam_pp", "layer_cam"])
def test_a_cam_batch_never_waits_for_the_host(name, device, no_host_sync):
    model, x = TwoObjects().to(device).eval(), two_object_images(8).to(device)
    with build_explainer(name, model, {"layer": "features.1"}) as ex:
        ex._explain_chunk(x, None)  # warm-up: cuDNN and cuBLAS set themselves up once
        with no_host_sync(device):
            maps = ex._explain_chunk(x, None)
    reference = build_explainer(name, TwoObjects(), {"layer": "features.1"})._explain_chunk(x.cpu(), None)
    torch.testing.assert_close(maps.cpu(), reference)
    assert maps.abs().amax() > 0
