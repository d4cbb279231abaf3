"""CAT-KD (class activation transfer): CAMs, pooling and loss against a numpy implementation of the
authors' equations, the map and classifier found in each xkd model, gradients, errors, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xkd.config import ConfigError, ModelConfig
from xkd.data.base import Batch
from xkd.distill.base import DistillContext, build_distiller
from xkd.distill.cat import (
    CATKD,
    binarize_cams,
    cat_loss,
    class_activation_maps,
    find_cam_source,
)
from xkd.models import build_model
from xkd.models.hooks import capture_features

pytestmark = pytest.mark.usefixtures("one_thread")


def context():
    return DistillContext(sample=torch.zeros(2, 1, 16, 16))


def fixed_batch():
    g = torch.Generator().manual_seed(2)
    return Batch(torch.rand(6, 1, 16, 16, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]))


# ---------------------------------------------------------------------------------------------- numpy reference


def np_adaptive_pool(x: np.ndarray, r: int) -> np.ndarray:
    """Adaptive average pooling of (N, K, H, W) to (N, K, r, r): bin i spans
    [floor(i H / r), ceil((i + 1) H / r)) (overlapping bins when r does not divide H)."""
    n, k, h, w = x.shape
    out = np.zeros((n, k, r, r))
    for i in range(r):
        h0, h1 = (i * h) // r, -((-(i + 1) * h) // r)
        for j in range(r):
            w0, w1 = (j * w) // r, -((-(j + 1) * w) // r)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def np_cat(cam_s: np.ndarray, cam_t: np.ndarray, r: int, normalize: bool) -> float:
    s, t = np_adaptive_pool(cam_s, r), np_adaptive_pool(cam_t, r)
    if normalize:
        s = s / np.sqrt((s**2).sum(axis=(2, 3), keepdims=True))
        t = t / np.sqrt((t**2).sum(axis=(2, 3), keepdims=True))
    return float(((s - t) ** 2).mean())


def np_cams_gap(feat: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """CAM_k[h, w] = sum_c W[k, c] F[c, h, w] (the authors' 1x1 conv_test, no bias), by loops."""
    n, c, h, w = feat.shape
    out = np.zeros((n, weight.shape[0], h, w))
    for k in range(weight.shape[0]):
        for ch in range(c):
            out[:, k] += weight[k, ch] * feat[:, ch]
    return out


def np_cams_flatten(feat: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """A flatten -> linear head: logit_k = sum_{c,h,w} W[k, (c, h, w)] F[c, h, w]; the CAM spreads
    that sum over the positions, scaled by H*W so that its mean is the logit (without the bias)."""
    n, c, h, w = feat.shape
    wr = weight.reshape(weight.shape[0], c, h, w)
    out = np.zeros((n, weight.shape[0], h, w))
    for k in range(weight.shape[0]):
        out[:, k] = (wr[k][None] * feat).sum(axis=1) * h * w
    return out


# ---------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("resolution", [1, 2, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_cat_loss_matches_numpy(resolution, normalize):
    g = torch.Generator().manual_seed(0)
    cam_s, cam_t = torch.randn(3, 5, 2, 2, generator=g), torch.randn(3, 5, 4, 4, generator=g)
    expected = np_cat(cam_s.detach().double().numpy(), cam_t.detach().double().numpy(), resolution, normalize)
    assert float(cat_loss(cam_s, cam_t, resolution, normalize)) == pytest.approx(expected, rel=1e-5)
    assert float(cat_loss(cam_t, cam_t, resolution, normalize)) == pytest.approx(0.0, abs=1e-7)


def test_cat_loss_by_hand():
    # one image, one class: the student's 2x2 map (1, 2, 3, 4) pooled to 1x1 is 2.5; the teacher's
    # 4x4 map of ones is 1 -> (2.5 - 1)^2 = 2.25. At r = 2 the student's map stays as it is, the
    # teacher's is ones: ((0)^2 + 1^2 + 2^2 + 3^2) / 4 = 3.5.
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.ones(1, 1, 4, 4)
    assert float(cat_loss(s, t, 1)) == pytest.approx(2.25)
    assert float(cat_loss(s, t, 2)) == pytest.approx(3.5)
    # normalised: s / sqrt(30), t / 2 -> sum of squared differences = 2 - 2 * (10 / (2 sqrt 30)), mean over 4
    assert float(cat_loss(s, t, 2, normalize=True)) == pytest.approx((2 - 10 / 30**0.5) / 4, rel=1e-6)


def test_class_activation_maps_match_numpy_and_reproduce_the_logits():
    g = torch.Generator().manual_seed(1)
    feat, w_gap, w_flat = (
        torch.randn(2, 3, 2, 2, generator=g),
        torch.randn(4, 3, generator=g),
        torch.randn(4, 12, generator=g),
    )
    gap = class_activation_maps(feat, w_gap, "gap")
    flat = class_activation_maps(feat, w_flat, "flatten")
    assert np.allclose(gap.numpy(), np_cams_gap(feat.numpy(), w_gap.numpy()), atol=1e-5)
    assert np.allclose(flat.numpy(), np_cams_flatten(feat.numpy(), w_flat.numpy()), atol=1e-5)
    # the spatial mean of each map is the logit without bias, for both heads
    assert torch.allclose(gap.mean(dim=(2, 3)), feat.mean(dim=(2, 3)) @ w_gap.t(), atol=1e-5)
    assert torch.allclose(flat.mean(dim=(2, 3)), feat.flatten(1) @ w_flat.t(), atol=1e-5)
    # with relu the negative activations are dropped first
    assert torch.allclose(
        class_activation_maps(feat, w_gap, "gap", relu=True), class_activation_maps(F.relu(feat), w_gap, "gap")
    )


def test_binarize_matches_the_authors_threshold():
    cam = torch.tensor([[[[1.0, -3.0], [0.5, 2.0]]]])  # mean |x| = 6.5 / 4 = 1.625 -> only 2.0 is above
    assert binarize_cams(cam).flatten().tolist() == [0.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------- maps of xkd's models


class GapReluHead(nn.Module):
    """conv -> BN -> functional ReLU -> global average -> linear, as torchvision's DenseNet."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)
        self.num_classes = 3

    def forward(self, x):
        return self.fc(F.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))


def _check_cams_give_logits(model, channels=1, size=16):
    src = find_cam_source(model, torch.zeros(2, channels, size, size))
    model.eval()
    x = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), capture_features(model, [src.layer]) as f:
        logits = model(x)
    classifier = model.get_submodule(src.classifier)
    cams = class_activation_maps(f[src.layer], classifier.weight, src.kind, src.relu)
    assert cams.shape[1] == logits.shape[1]
    assert torch.allclose(cams.mean(dim=(2, 3)) + classifier.bias, logits, atol=1e-5)
    return src


def test_the_last_map_and_classifier_of_the_tiny_models(tiny_pair):
    student, teacher = tiny_pair
    s = _check_cams_give_logits(student)
    assert (s.layer, s.classifier, s.kind, s.relu, s.shape) == ("blocks", "classifier", "flatten", False, (8, 2, 2))
    t = _check_cams_give_logits(teacher)
    assert (t.layer, t.classifier, t.kind, t.relu, t.shape) == ("layer3", "fc", "gap", False, (16, 4, 4))


def test_a_relu_between_the_map_and_the_pooling_is_found():
    src = _check_cams_give_logits(GapReluHead())
    assert (src.layer, src.kind, src.relu) == ("norm", "gap", True)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_models(name):
    model = build_model(ModelConfig(name), 3, 3, 16)
    src = _check_cams_give_logits(model, channels=3)
    # the largest map, not ResNet's 1x1 average-pool output; DenseNet's functional ReLU after norm5
    assert (src.layer, src.kind, src.relu) == {
        "resnet18": ("layer4", "gap", False),
        "densenet121": ("features", "gap", True),
    }[name]
    assert src.shape[1:] == (2, 2)


# ---------------------------------------------------------------------------------------------- the distiller


def test_terms_match_an_independent_computation(tiny_pair):
    student, teacher = tiny_pair
    d = build_distiller("cat_kd", student, teacher, {"beta": 2.0, "ce_weight": 0.5}, context())
    assert isinstance(d, CATKD)
    d.eval()  # BatchNorm in eval mode, so the hand computation below sees the same statistics
    batch = fixed_batch()
    with torch.no_grad():
        logits, terms = d(batch)
        # the features by direct calls (no hooks): the student's blocks output, the teacher's layer3
        f_s = student.blocks(batch.images)
        x = teacher.relu(teacher.bn1(teacher.conv1(batch.images)))
        f_t = teacher.layer3(teacher.layer2(teacher.layer1(x)))
    cam_s = np_cams_flatten(f_s.detach().double().numpy(), student.classifier.weight.detach().double().numpy())
    cam_t = np_cams_gap(f_t.detach().double().numpy(), teacher.fc.weight.detach().double().numpy())
    assert set(terms) == {"ce", "cat"}
    assert float(terms["cat"]) == pytest.approx(2.0 * np_cat(cam_s, cam_t, 2, False), rel=1e-4)
    with torch.no_grad():
        expected_ce = 0.5 * float(F.cross_entropy(student(batch.images), batch.labels))
        assert torch.allclose(logits, student(batch.images))
    assert float(terms["ce"]) == pytest.approx(expected_ce, rel=1e-5)
    for model in (student, teacher):  # hooks removed after use
        assert all(not m._forward_hooks for m in model.modules())


def test_maps_are_fp32_under_autocast(tiny_pair):
    # on a GPU amp: auto runs the einsum of the maps in bf16; they are computed in fp32 as without amp
    student, teacher = tiny_pair
    d = build_distiller("cat_kd", student, teacher, {}, context()).eval()
    batch = fixed_batch()
    src_s, _ = d.sources
    with torch.no_grad(), capture_features(student, [src_s.layer], detach=True) as fs:
        student(batch.images)
    feat = fs[src_s.layer]
    exact = d.cams(student, src_s, feat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = d.cams(student, src_s, feat.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, d.cams(student, src_s, feat.bfloat16().float()), rtol=0, atol=0)
    assert (mixed - exact).abs().max() < 0.02 * exact.abs().max()  # only the features' rounding


@pytest.mark.parametrize(("binarize", "normalize"), [(True, False), (False, True)])
def test_binarize_and_normalize_options(binarize, normalize, tiny_pair):
    student, teacher = tiny_pair
    params = {"binarize": binarize, "normalize": normalize, "resolution": 2}
    d = build_distiller("cat_kd", student, teacher, params, context())
    d.eval()
    batch = fixed_batch()
    with torch.no_grad():
        _, terms = d(batch)
        f_s = student.blocks(batch.images)
        x = teacher.relu(teacher.bn1(teacher.conv1(batch.images)))
        f_t = teacher.layer3(teacher.layer2(teacher.layer1(x)))
    cam_s = np_cams_flatten(f_s.detach().double().numpy(), student.classifier.weight.detach().double().numpy())
    cam_t = np_cams_gap(f_t.detach().double().numpy(), teacher.fc.weight.detach().double().numpy())
    if binarize:  # 1 above the map's mean absolute value (the authors' L1 norm / (h w))
        cam_t = (cam_t > np.abs(cam_t).mean(axis=(2, 3), keepdims=True)).astype(float)
    assert float(terms["cat"]) == pytest.approx(0.7 * np_cat(cam_s, cam_t, 2, normalize), rel=1e-4)


def test_gradients_reach_the_student_and_its_classifier_never_the_teacher(tiny_pair):
    student, teacher = tiny_pair
    d = build_distiller("cat_kd", student, teacher, {"ce_weight": 0.0}, context())
    d.train()
    _, terms = d(fixed_batch())
    terms["cat"].backward()
    assert student.classifier.weight.grad is not None and student.classifier.weight.grad.abs().sum() > 0
    assert student.blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


@pytest.mark.parametrize("ce_weight", [0.0, 1.0])
def test_a_few_steps_reduce_the_loss(ce_weight, tiny_pair, train_steps):
    student, teacher = tiny_pair
    d = build_distiller("cat_kd", student, teacher, {"beta": 1.0, "ce_weight": ce_weight}, context())
    losses = train_steps(d, fixed_batch(), 30, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0]  # CAT alone (the authors' onlyCAT) or CE + CAT


def test_forward_before_setup_is_a_clear_error(tiny_pair):
    d = build_distiller("cat_kd", *tiny_pair)
    with pytest.raises(RuntimeError, match="setup"):
        d(fixed_batch())


class NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.num_classes = 3

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


class MLPHead(nn.Module):
    """The classifier reads a hidden layer's output, not a feature map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.hidden = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3)
        self.num_classes = 3

    def forward(self, x):
        return self.fc(torch.relu(self.hidden(self.conv(x).mean(dim=(2, 3)))))


class Scaled(nn.Module):
    """The last linear layer's output is rescaled: it is not the logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.num_classes = 3

    def forward(self, x):
        return 2.0 * self.inner(x)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (NoLinear, "no nn.Linear"),
        (MLPHead, "no \\(N, C, H, W\\) feature map"),
        (lambda: Scaled(GapReluHead()), "does not produce"),
    ],
)
def test_models_without_a_usable_map_or_classifier_fail_in_preflight(make, match, tiny_model):
    teacher = tiny_model("teacher", 1)
    d = build_distiller("cat_kd", make(), teacher)
    with pytest.raises(ConfigError, match=match):
        d.preflight(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ConfigError, match=match):
        d.setup(context())


def test_layers_name_the_map_or_fail_clearly(tiny_pair):
    student, teacher = tiny_pair
    d = build_distiller("cat_kd", student, teacher, {"layers": [["blocks.2", "layer3.0"]]}, context())
    assert (d.sources[0].layer, d.sources[1].layer) == ("blocks.2", "layer3.0")
    bad = build_distiller("cat_kd", student, teacher, {"layers": [["blocks.1", "layer3"]]})
    with pytest.raises(ConfigError, match="layer 'blocks.1'"):
        bad.preflight(torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize(
    "params",
    [{"beta": -1.0}, {"ce_weight": float("nan")}, {"resolution": 0}, {"layers": [["a", "b"], ["c", "d"]]}, {"lr": 1}],
)
def test_bad_params_are_config_errors(params, tiny_pair):
    with pytest.raises(ConfigError):
        build_distiller("cat_kd", *tiny_pair, params)
