"""UniCAM: a hand-built student whose copied and own channels sit in known regions, the formula against a
hand computation and against the authors' ``P_DC`` written out in the test, the KD-student-vs-base-model maps,
and the explainer contract (shapes, hooks, frozen teacher and base, modes, errors)."""

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

pytestmark = pytest.mark.usefixtures("one_thread")


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


def authors_pdc(x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The UniCAM authors' ``P_DC(x, z, y)`` (gadhane/UniCAM ``pdCor.py``, the statistic of ``PDC_Model`` +
    ``PDC_CAM.get_loss``) written from its definition, independently of xkd.stats: distances from explicit
    pairwise differences with their 1e-18 under the root, U-centring with a zero diagonal, ``(A . B) =
    sum(A * B) / (n (n - 3))``, z projected out of x (their 1e-12 in the denominator), correlation with y
    (their 1e-18 under the root). Differentiable in x and z."""

    def ucentre(f: torch.Tensor) -> torch.Tensor:
        f = f.reshape(f.shape[0], -1).double()
        n = f.shape[0]
        d = torch.sqrt(((f[None, :, :] - f[:, None, :]) ** 2).sum(-1) + 1e-18)
        u = d - d.sum(0, keepdim=True) / (n - 2) - d.sum(1, keepdim=True) / (n - 2) + d.sum() / ((n - 1) * (n - 2))
        return u - torch.diag(torch.diag(u))

    def br(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        return (a * b).sum() / (n * (n - 3))

    a, c, t = ucentre(x), ucentre(z), ucentre(y)
    p = a - br(a, c) / (br(c, c) + 1e-12) * c
    return br(p, t) / torch.sqrt(br(p, p) * br(t, t) + 1e-18)


def authors_cam(stat: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of a statistic at ``acts`` (the authors' ``PDC_CAM``: channel weights = spatial mean of the
    gradient, weighted sum, negative values to 0), before their min-max scaling (which xkd does not do)."""
    (g,) = torch.autograd.grad(stat, acts)
    return F.relu((g.mean(dim=(2, 3), keepdim=True) * acts).sum(1)).detach()


R3 = (slice(9, 14), slice(2, 7))  # a third region (a base model's own channel)


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


@pytest.mark.parametrize("kind", ["residual", "kd_given_base", "base_given_kd"])
def test_maps_equal_autograd_of_the_authors_pdc(kind):
    """Each target kind is the authors' map: Grad-CAM of ``P_DC(first, second, target)`` at the first model's
    layer (``PDC_Model(modelX, modelY)``: the CAM is taken at modelX), with P_DC written out in the test."""
    torch.manual_seed(0)
    student, teacher, base = RegionNet(R1, R2), RegionNet(R1), RegionNet(R1, R3)
    images, labels = region_batch(8, seed=2)
    images[:, :, R3[0], R3[1]] += torch.linspace(-1, 1, 8)[:, None, None, None]  # the base's own signal
    y = F.one_hot(labels, 2)
    first, second = {"residual": (student, teacher), "kd_given_base": (student, base)}.get(kind, (base, student))
    acts = first.features(images).detach().requires_grad_(True)
    expected = authors_cam(authors_pdc(acts, second.features(images), y), acts)
    with UniCAM(student, {"kind": kind, "batch_size": 8}, teacher=teacher, base=base) as uc:
        got = uc.explain(images, labels)
    torch.testing.assert_close(got.maps, expected.float(), atol=1e-10, rtol=1e-6)  # maps ~1e-4
    assert expected.abs().sum() > 0
    assert got.role == ("base" if kind == "base_given_kd" else None) and got.layer == "features"


def test_kd_given_base_maps_what_the_student_has_beyond_the_base_and_base_given_kd_the_reverse():
    """Hand-built: the KD student has the base's feature (R1) plus a class signal (R2) the base lacks, so the
    features "learned because of KD" are R2; a base with R1 and R2 and a student with only R1: the features
    "the KD student did not retain" are the base's R2."""
    torch.manual_seed(0)
    images, labels = region_batch()
    kd, base = RegionNet(R1, R2), RegionNet(R1)
    with UniCAM(kd, {"kind": "kd_given_base", "batch_size": 16}, teacher=base, base=base) as uc:
        learned = uc.explain(images, labels).maps
    assert share(learned, R2).min() > 0.999
    kd, base = RegionNet(R1), RegionNet(R1, R2)
    with UniCAM(kd, {"kind": "base_given_kd", "batch_size": 16}, teacher=kd, base=base) as uc:
        dropped = uc.explain(images, labels).maps
    assert share(dropped, R2).min() > 0.999


def test_a_base_with_the_students_features_leaves_nothing_learned_by_kd():
    """A base model whose features equal the student's: ``P_B(S) = 0``, so the kd_given_base statistic is 0 and
    its maps are zero (and the same both ways)."""
    student, teacher = pair()
    base = RegionNet(R1, R2)
    base.load_state_dict(student.state_dict())
    images, labels = region_batch(8)
    u_s, u_b = (u_centered(distance_matrix(m.features(images))) for m in (student, base))
    u_y = u_centered(distance_matrix(F.one_hot(labels, 2)))
    assert float(u_correlation(u_residual(u_s, u_b), u_y)) == 0.0  # P_B(S) is exactly 0
    for kind in ("kd_given_base", "base_given_kd"):
        with UniCAM(student, {"kind": kind, "batch_size": 8}, teacher=teacher, base=base) as uc:
            assert torch.count_nonzero(uc.explain(images, labels).maps) == 0
    with UniCAM(student, {"kind": "residual", "batch_size": 8}, teacher=teacher) as uc:
        assert uc.explain(images, labels).maps.abs().sum() > 0  # while the teacher leaves the student's R2


def test_base_kinds_equal_residual_with_the_base_in_the_teachers_place():
    """kd_given_base = residual with the base as reference; base_given_kd = the residual map of the base
    with the KD student as reference (the same P_DC, the roles named)."""
    torch.manual_seed(0)
    student, teacher, base = RegionNet(R1, R2), RegionNet(R2), RegionNet(R1, R3)
    images, labels = region_batch(16, seed=3)
    images[:, :, R3[0], R3[1]] += torch.rand(16, 1, 1, 1, generator=torch.Generator().manual_seed(4))
    p = {"batch_size": 8}
    with UniCAM(student, {**p, "kind": "kd_given_base"}, teacher=teacher, base=base) as uc:
        both = uc.explain_kinds(images, labels, ("kd_given_base", "base_given_kd", "residual"))
    with UniCAM(student, {**p, "kind": "residual"}, teacher=base) as uc:
        torch.testing.assert_close(both["kd_given_base"].maps, uc.explain(images, labels).maps)
    with UniCAM(base, {**p, "kind": "residual"}, teacher=student) as uc:
        torch.testing.assert_close(both["base_given_kd"].maps, uc.explain(images, labels).maps)
    with UniCAM(student, {**p, "kind": "residual"}, teacher=teacher) as uc:
        torch.testing.assert_close(both["residual"].maps, uc.explain(images, labels).maps)


def test_needs_base_hook_and_missing_base_errors():
    assert UniCAM.needs_base_for == ("kd_given_base", "base_given_kd")
    for kind in ("kd_given_base", "base_given_kd"):
        assert UniCAM.needs_base({"kind": kind}) and UniCAM.needs_base(
            resolve_explainer("unicam", {"kind": kind}).params
        )
        assert UniCAM.needs_base(resolve_explainer("unicam+superpixel", {"kind": kind}).params)  # wrapped params
    for params in (None, {}, {"kind": "residual"}, {"kind": "distilled"}):
        assert not UniCAM.needs_base(params)
    assert not UniCAM.needs_base(resolve_explainer("unicam").params)
    student, teacher = pair()
    for kind in ("kd_given_base", "base_given_kd"):
        with pytest.raises(ConfigError, match=r"base=base_model.*scratch student"):
            UniCAM(student, {"kind": kind}, teacher=teacher)
        with pytest.raises(ConfigError, match="base="):  # through the registry, as the scoring loop builds it
            build_explainer("unicam", student, {"kind": kind}, teacher=teacher)
    with pytest.raises(LayerNotFoundError, match="'nope' not found"):
        UniCAM(student, {"kind": "kd_given_base", "base_layer": "nope"}, teacher=teacher, base=RegionNet(R1))
    with pytest.raises(ValueError, match="base must be an nn.Module"):
        UniCAM(student, {"kind": "kd_given_base"}, teacher=teacher, base="scratch")
    with UniCAM(student, {}, teacher=teacher) as uc:
        with pytest.raises(ConfigError, match="base="):
            uc.explain_kinds(*region_batch(8), ("kd_given_base",))
    with build_explainer("unicam", student, {"kind": "kd_given_base"}, teacher=teacher, base=RegionNet(R1)) as ex:
        assert ex.explain(*region_batch(8)).maps.shape == (8, 16, 16)  # base= reaches the explainer


def test_base_model_is_frozen_hooks_released_and_modes_restored(tiny_pair, tiny_model):
    student, teacher = tiny_pair
    base = tiny_model("student", 5)  # the student's architecture, other weights
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 3
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for m in (student, teacher, base):
        m.train()
    with UniCAM(student, {"kind": "base_given_kd", "batch_size": 4}, teacher=teacher, base=base) as uc:
        maps = uc.explain_kinds(images, labels, ("kd_given_base", "base_given_kd"))
    for att in maps.values():
        assert att.maps.shape == (8, 16, 16) and torch.isfinite(att.maps).all() and (att.maps >= 0).all()
    assert maps["base_given_kd"].layer == default_layer(base)
    assert all_hooks(student) == 0 and all_hooks(base) == 0 and all_hooks(teacher) == 0
    assert all(m.training for model in (student, teacher, base) for m in model.modules())
    assert all(p.grad is None for model in (student, teacher, base) for p in model.parameters())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats too: the base ran in eval mode


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
    with pytest.raises(ConfigError, match="kind: 'both' is not allowed.*kd_given_base"):
        UniCAM(student, {"kind": "both"}, teacher=teacher)
    with UniCAM(student, {}, teacher=teacher) as uc:
        with pytest.raises(ValueError, match="at least 4 images"):
            uc.explain(images[:3], labels[:3])
        with pytest.warns(UserWarning, match="same class"):
            maps = uc.explain(images[labels == 1], labels[labels == 1]).maps
    assert torch.count_nonzero(maps) == 0


def test_one_class_batch_warns_once_per_call_and_zeroes_only_its_own_maps(recwarn):
    student, teacher = pair()
    images, labels = region_batch(16)
    mixed = torch.cat([torch.arange(4), torch.nonzero(labels == 1).flatten()[:4]])  # chunk 2 all of class 1
    with UniCAM(student, {"batch_size": 4}, teacher=teacher) as uc:
        uc.explain(images[:8], labels[:8])  # both chunks hold two classes
        assert not [w for w in recwarn if "same class" in str(w.message)]
        with pytest.warns(UserWarning, match="same class.*unicam.batch_size: 4") as caught:
            maps = uc.explain(images[mixed], labels[mixed]).maps
    assert sum("same class" in str(w.message) for w in caught) == 1  # one warning, read once per call
    assert torch.count_nonzero(maps[:4]) > 0 and torch.count_nonzero(maps[4:]) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("target", ["onehot", "class_mean"])
def test_a_unicam_chunk_does_not_wait_for_the_gpu(target, no_host_sync):
    student, teacher = pair()
    images, labels = (t.cuda() for t in region_batch(8))
    with UniCAM(student.cuda(), {"target": target}, teacher=teacher.cuda()) as uc:
        uc._explain_chunk(images, labels, ("residual",), [])  # warm-up
        flags: list[torch.Tensor] = []
        with no_host_sync(images.device):
            cams = uc._explain_chunk(images, labels, ("residual",), flags)
    assert cams["residual"].shape == (8, 16, 16) and not bool(flags[0])


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
