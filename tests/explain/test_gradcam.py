"""Grad-CAM: hand-computed values, a known evidence region, sanity checks and the explainer contract."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from xkd.config import ConfigError
from xkd.explain import Attribution, GradCAM, build_explainer
from xkd.explain.base import check_maps
from xkd.metrics.agreement import map_pearson
from xkd.models import LayerNotFoundError

BACKENDS = ["xkd", "captum"]


pytestmark = pytest.mark.usefixtures("one_thread")


R1 = (slice(2, 7), slice(2, 7))  # class 0 evidence: a bright square
R2 = (slice(9, 14), slice(11, 16))  # class 1 evidence: a dark square


class TwoObjects(nn.Module):
    """Channel 0 sees bright pixels, channel 1 dark ones (3x3 blur, stride 2, ReLU); class c's logit
    is the mean of channel c. Grad-CAM of class 0 must point at bright squares, class 1 at dark."""

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


def two_object_images(n: int = 4, width: int = 18) -> torch.Tensor:
    x = torch.rand(n, 1, 16, width) * 0.1
    x[:, :, R1[0], R1[1]] = 1.0
    x[:, :, R2[0], R2[1]] = -1.0
    return x


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_cam_with_upsampling(backend):
    # one 2x2/stride-2 conv summing each patch (A is 2x2), logits = (mean A, -mean A):
    # dy0/dA_ij = 1/4, so w = 1/4 and cam = ReLU(A / 4); class 1 has w = -1/4 and cam = ReLU(-A / 4).
    conv = nn.Conv2d(1, 1, 2, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    model = nn.Sequential(conv, nn.Flatten(), Mean())
    x = torch.tensor([[1.0, 2.0, 0.0, 1.0], [3.0, 2.0, 1.0, 0.0], [-1.0, 0.0, -4.0, -4.0], [0.0, -1.0, -4.0, -4.0]])
    a = torch.tensor([[8.0, 2.0], [-2.0, -16.0]])  # patch sums
    # bilinear 2 -> 4 with align_corners=False: output rows sample input rows 0, 0.25, 0.75, 1
    up = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    expected0 = up @ torch.relu(a / 4) @ up.T
    expected1 = up @ torch.relu(-a / 4) @ up.T
    with GradCAM(model, {"layer": "0", "backend": backend}) as gc_:
        maps = gc_.explain(x.view(1, 1, 4, 4).repeat(2, 1, 1, 1), torch.tensor([0, 1])).maps
    torch.testing.assert_close(maps[0], expected0)
    torch.testing.assert_close(maps[1], expected1)
    assert maps[0, 0, 0] == 2.0 and maps[1, 3, 3] == 4.0


class Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=1, keepdim=True)
        return torch.cat([m, -m], dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [16, 18])
def test_map_points_at_the_known_evidence_region(backend, width):
    model, x = TwoObjects(), two_object_images(width=width)
    with GradCAM(model, {"backend": backend, "layer": "features.1"}) as gc_:
        for target, (rows, cols) in [(0, R1), (1, R2)]:
            maps = gc_.explain(x, torch.full((len(x),), target)).maps
            for m in maps:
                i, j = divmod(int(m.argmax()), width)
                assert rows.start <= i < rows.stop and cols.start <= j < cols.stop
                inside = torch.zeros_like(m, dtype=torch.bool)
                inside[rows, cols] = True
                assert m[inside].mean() > 5 * m[~inside].mean()


def test_randomised_model_gives_different_maps(tiny_model):
    # model-parameter randomisation test (Adebayo et al. 2018): maps must depend on the weights
    model, x = tiny_model("teacher", 0), torch.rand(8, 1, 16, 16)
    t = torch.randint(0, 3, (8,))
    fixed = GradCAM(model).explain(x, t).maps
    assert map_pearson(fixed, fixed) == pytest.approx(1.0)
    scores = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
        scores.append(map_pearson(fixed, GradCAM(model).explain(x, t).maps))
    assert max(scores) < 0.9 and sum(scores) / len(scores) < 0.5


@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize("relu", [True, False])
def test_backends_agree(role, relu, tiny_model):
    model = tiny_model(role, 0)
    x = torch.rand(10, 1, 16, 20 if role == "teacher" else 16)
    t = torch.randint(0, 3, (10,))
    # the conv output (not the default ReLU output): a random tiny CNN can have an all-zero ReLU'd CAM
    layer = "blocks.2.0" if role == "student" else None
    own = GradCAM(model, {"relu": relu, "layer": layer}).explain(x, t).maps
    ref = GradCAM(model, {"relu": relu, "layer": layer, "backend": "captum"}).explain(x, t).maps
    scale = ref.abs().max()
    assert scale > 0
    assert (own - ref).abs().max() <= 1e-5 * scale
    if not relu:
        assert (own < 0).any()


def test_in_place_op_after_layer_does_not_corrupt_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 36, 2))
    x, t = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 0, 1])
    own = GradCAM(model, {"layer": "0", "relu": False}).explain(x, t).maps
    ref = GradCAM(model, {"layer": "0", "relu": False, "backend": "captum"}).explain(x, t).maps
    torch.testing.assert_close(own, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_one_by_one(backend, tiny_model):
    model, x = tiny_model("teacher", 0), torch.rand(7, 1, 16, 16)
    t = torch.randint(0, 3, (7,))
    batched = GradCAM(model, {"backend": backend, "batch_size": 3}).explain(x, t).maps
    whole = GradCAM(model, {"backend": backend}).explain(x, t).maps
    single = torch.cat(
        [GradCAM(model, {"backend": backend}).explain(x[i : i + 1], t[i : i + 1]).maps for i in range(7)]
    )
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contract_mode_grads_and_hooks(backend, tiny_model):
    model = tiny_model("teacher", 0)
    model.train()
    model.layer1.eval()  # mixed flags must come back exactly
    flags = [m.training for m in model.modules()]
    x = torch.rand(5, 1, 12, 20)
    with GradCAM(model, {"backend": backend}) as gc_:
        att = gc_.explain(x, torch.tensor([0, 1, 2, 0, 1]))
        assert all_hooks(model) == 0
    assert isinstance(att, Attribution) and att.method == "grad_cam" and att.layer == "layer3"
    assert att.maps.dtype == torch.float32 and att.maps.shape == (5, 12, 20)
    check_maps(att.maps, (12, 20))
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all_hooks(model) == 0


def test_targets_none_explains_the_predicted_class_and_works_under_no_grad(tiny_model):
    model, x = tiny_model("student", 0), torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        pred = model.eval()(x).argmax(dim=1)
        att = GradCAM(model).explain(x, None)
    torch.testing.assert_close(att.maps, GradCAM(model).explain(x, pred).maps)
    assert att.layer == model.xkd_default_layer


def test_frozen_model_is_explained(tiny_model):
    model, x = tiny_model("teacher", 0), torch.rand(3, 1, 16, 16)
    for p in model.parameters():
        p.requires_grad_(False)
    maps = GradCAM(model, {"relu": False}).explain(x, torch.tensor([0, 1, 2])).maps
    assert maps.abs().sum() > 0 and all(p.grad is None for p in model.parameters())


def test_hooks_and_tensors_do_not_grow_over_100_calls(tiny_model):
    model, x, t = tiny_model("student", 0), torch.rand(2, 1, 16, 16), torch.tensor([0, 1])
    explainer = GradCAM(model)
    explainer.explain(x, t)
    gc.collect()
    before = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
    for _ in range(100):
        explainer.explain(x, t)
        assert all_hooks(model) == 0 and not explainer._handles
    gc.collect()
    after = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
    assert after <= before + 2


def test_unknown_layer_lists_candidates(tiny_model):
    with pytest.raises(LayerNotFoundError, match=r"layer 'blocks\.9'.*blocks\.0\.0"):
        GradCAM(tiny_model("student", 0), {"layer": "blocks.9"})


def test_non_spatial_layer_is_rejected_clearly(tiny_model):
    model = tiny_model("student", 0)
    with pytest.raises(ValueError, match="classifier.*(N, K, h, w)"):
        GradCAM(model, {"layer": "classifier"}).explain(torch.rand(1, 1, 16, 16), torch.tensor([0]))
    assert all_hooks(model) == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"backend": "tf"}, "allowed values: 'xkd', 'captum'"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 1}, "unknown key"),
    ],
)
def test_params_are_validated(params, message, tiny_model):
    with pytest.raises(ConfigError, match=message):
        build_explainer("grad_cam", tiny_model("student", 0), params)


def test_build_explainer_uses_defaults(tiny_model):
    explainer = build_explainer("grad_cam", tiny_model("student", 0))
    assert isinstance(explainer, GradCAM)
    assert (explainer.params.backend, explainer.params.relu, explainer.params.batch_size) == ("xkd", True, 256)
