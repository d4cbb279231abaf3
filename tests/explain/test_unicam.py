"""UniCAM: a hand-built student whose copied and own channels sit in known regions, the formula against a
hand computation, and the explainer contract (shapes, hooks, frozen teacher, modes, errors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xkd.config import ConfigError
from xkd.explain import build_explainer
from xkd.explain.base import resolve_explainer
from xkd.explain.unicam import UniCAM, chunk_bounds
from xkd.models import LayerNotFoundError
from xkd.models.hooks import default_layer
from xkd.registry import EXPLAINERS
from xkd.scoring import explain
from xkd.stats import distance_matrix, u_centered, u_correlation, u_residual


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


R1 = (slice(2, 7), slice(2, 7))  # the teacher's feature: the student's channel 0 copies it
R2 = (slice(9, 14), slice(9, 14))  # the student's own, class-relevant signal (channel 1)


def region_mask(r: tuple[slice, slice]) -> torch.Tensor:
    m = torch.zeros(1, 16, 16)
    m[:, r[0], r[1]] = 1
    return m


class Masks(nn.Module):
    """Channel k = the grey image inside region k (zero elsewhere)."""

    def __init__(self, *regions: tuple[slice, slice]) -> None:
        super().__init__()
        self.register_buffer("m", torch.cat([region_mask(r) for r in regions]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.m


class RegionNet(nn.Module):
    def __init__(self, *regions: tuple[slice, slice]) -> None:
        super().__init__()
        self.features = Masks(*regions)
        self.post = nn.Identity()
        self.fc = nn.Linear(len(regions), 2)
        self.xkd_default_layer = "features"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.post(self.features(x)).mean(dim=(2, 3)))


def region_batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """R1 holds a_i = +-U(0.5, 1) (class-unrelated), R2 holds b_i = +-1 with class = (b_i > 0); small noise."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, generator=g) * 0.5 + 0.5) * torch.tensor([1.0, -1.0]).repeat(n // 2)
    b = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(n // 4)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.05
    x[:, :, R1[0], R1[1]] += a[:, None, None, None]
    x[:, :, R2[0], R2[1]] += b[:, None, None, None]
    return x, (b > 0).long()


def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return RegionNet(R1, R2), RegionNet(R1)


def share(maps: torch.Tensor, r: tuple[slice, slice]) -> torch.Tensor:
    return maps[:, r[0], r[1]].flatten(1).sum(1) / maps.flatten(1).sum(1)


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_distilled_maps_the_copied_channel_and_residual_the_own_channel():
    student, teacher = pair()
    images, labels = region_batch()
    with UniCAM(student, {"batch_size": 16}, teacher=teacher) as uc:
        maps = uc.explain_pair(images, labels)
    assert share(maps["distilled"].maps, R1).min() > 0.999  # every image: all mass on the teacher's feature
    assert share(maps["residual"].maps, R2).min() > 0.999  # every image: all mass on the student's own signal


@pytest.mark.parametrize("kind", ["distilled", "residual"])
def test_maps_equal_the_hand_computed_gradient_cam(kind):
    student, teacher = pair()
    images, labels = region_batch(8, seed=1)
    acts = student.features(images).detach().requires_grad_(True)
    u_s, u_t = u_centered(distance_matrix(acts)), u_centered(distance_matrix(teacher.features(images)))
    if kind == "distilled":
        f = u_correlation(u_s, u_t)
    else:
        f = u_correlation(u_residual(u_s, u_t), u_centered(distance_matrix(F.one_hot(labels, 2))))
    (g,) = torch.autograd.grad(f, acts)
    expected = F.relu((g.mean(dim=(2, 3), keepdim=True) * acts).sum(1))
    with UniCAM(student, {"kind": kind, "batch_size": 8}, teacher=teacher) as uc:
        got = uc.explain(images, labels).maps
    torch.testing.assert_close(got, expected.float(), atol=1e-9, rtol=1e-5)
    assert got.abs().sum() > 0


def test_feature_layer_after_the_explained_layer():
    student, teacher = pair()
    images, labels = region_batch(8)
    params = {"kind": "residual", "batch_size": 8}
    with (
        UniCAM(student, params, teacher=teacher) as a,
        UniCAM(student, {**params, "feature_layer": "post"}, teacher=teacher) as b,
    ):
        torch.testing.assert_close(a.explain(images, labels).maps, b.explain(images, labels).maps)
    with pytest.raises(ValueError, match="feature_layer 'features'"):
        UniCAM(student, {"layer": "post", "feature_layer": "features"}, teacher=teacher).explain(images, labels)


@pytest.mark.filterwarnings("ignore:unicam. all images")  # an untrained student may predict one class
def test_contract_on_conv_models_hooks_modes_and_frozen_teacher(tiny_pair):
    student, teacher = tiny_pair
    images = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10) % 3
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student.train()
    teacher.train()
    uc = EXPLAINERS.get("unicam")(student, {"batch_size": 4, "target": "class_mean"}, teacher=teacher)
    with uc:
        both = uc.explain_pair(images, labels)
        single = uc.explain(images, None)  # predicted classes
    for att in [*both.values(), single]:
        assert att.maps.shape == (10, 16, 16) and att.maps.dtype == torch.float32
        assert torch.isfinite(att.maps).all() and (att.maps >= 0).all()
        assert att.method == "unicam" and att.layer == default_layer(student)
    assert both["residual"].maps.abs().sum() > 0 and both["distilled"].maps.abs().sum() > 0
    assert all_hooks(student) == 0 and all_hooks(teacher) == 0
    assert student.training and teacher.training and all(m.training for m in teacher.modules())
    assert all(p.grad is None for p in [*student.parameters(), *teacher.parameters()])
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats too: the teacher ran in eval mode


def test_chunks_merge_a_small_remainder_and_maps_depend_on_the_batch():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 10)]
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(5, 64) == [(0, 5)]
    student, teacher = pair()
    images, labels = region_batch(16)
    with UniCAM(student, {"kind": "distilled", "batch_size": 16}, teacher=teacher) as uc:
        whole = uc.explain(images, labels).maps
    with UniCAM(student, {"kind": "distilled", "batch_size": 8}, teacher=teacher) as uc:
        halves = uc.explain(images, labels).maps
    assert not torch.allclose(whole, halves)  # documented: the statistic is over the batch


def test_errors_name_the_problem_and_the_fix():
    student, teacher = pair()
    images, labels = region_batch(8)
    with pytest.raises(LayerNotFoundError, match="'nope' not found.*features"):
        UniCAM(student, {"layer": "nope"}, teacher=teacher)
    with pytest.raises(LayerNotFoundError, match="'nope' not found"):
        UniCAM(student, {"teacher_layer": "nope"}, teacher=teacher)
    with pytest.raises(ValueError, match="teacher=teacher_model"):
        UniCAM(student, {})
    with pytest.raises(ConfigError, match="batch_size must be >= 4"):
        UniCAM(student, {"batch_size": 2}, teacher=teacher)
    with pytest.raises(ConfigError, match="kind: 'both' is not allowed"):
        UniCAM(student, {"kind": "both"}, teacher=teacher)
    with UniCAM(student, {}, teacher=teacher) as uc:
        with pytest.raises(ValueError, match="at least 4 images"):
            uc.explain(images[:3], labels[:3])
        with pytest.warns(UserWarning, match="same class"):
            maps = uc.explain(images[labels == 1], labels[labels == 1]).maps
    assert torch.count_nonzero(maps) == 0


def test_fewer_images_than_unicam_needs_are_padded_and_only_their_maps_returned():
    student, teacher = pair()
    x, y = region_batch(8)
    spec = resolve_explainer("unicam")
    maps = explain(spec, student, x[:2], y[:2], pad=(x[2:], y[2:]), teacher=teacher)
    assert maps.shape == (2, 16, 16)
    with build_explainer("unicam", student, {}, teacher=teacher) as ex:
        full = ex.explain(x[:4], y[:4]).maps
    torch.testing.assert_close(maps, full[:2])  # the same as explaining them with the padding images
    with pytest.raises(ValueError, match="at least 4 images"):
        explain(spec, student, x[:2], y[:2], teacher=teacher)
