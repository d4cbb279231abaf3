"""XDistillation: superpixel-sum targets, the on-disk cache, the frozen CAE, the feature-reduction gate."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors import safe_open
from torch import nn

from xkd.cache import Cache
from xkd.config import ConfigError
from xkd.data.base import Batch
from xkd.distill import build_distiller
from xkd.distill import xdistill as X
from xkd.distill.base import DistillContext
from xkd.distill.cae import CAE
from xkd.distill.xdistill import XDistillParams, XDistillStudent, normalise_targets, superpixel_targets
from xkd.explain.base import build_explainer
from xkd.models.hooks import LayerNotFoundError, capture_features, default_layer
from xkd.schema import from_dict

FAST = {"explainer": "grad_cam", "cae_epochs": 2, "cae_batch_size": 4, "cae_grid": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cnn(tiny_model):
    """``cnn(seed=0)``: the tiny student (kdfmv_cnn)."""
    return lambda seed=0: tiny_model("student", seed)


@pytest.fixture
def resnet(tiny_model):
    """``resnet(seed=1)``: the tiny teacher (cifar_resnet)."""
    return lambda seed=1: tiny_model("teacher", seed)


@pytest.fixture
def context(tmp_path, tiny_data):
    """``context(data=None, key="teacher-a", seed=0)``: a setup context caching under ``tmp_path``."""

    def make(data=None, key="teacher-a", seed=0):
        data = data if data is not None else tiny_data()
        return DistillContext(
            sample=torch.zeros(2, 1, 16, 16), train=data, cache_dir=tmp_path, teacher_key=key, seed=seed
        )

    return make


@pytest.fixture
def fixed_batch(tiny_data):
    """``fixed_batch(n=6)``: the first ``n`` tiny images as one batch."""

    def make(n=6):
        data = tiny_data(n)
        return Batch(data.images, data.labels)

    return make


# -- targets ---------------------------------------------------------------------------------------


def test_superpixel_targets_are_sums_per_superpixel_by_hand(monkeypatch):
    # a 2x3 map with three superpixels {a: (0,0),(0,1)}, {b: (0,2),(1,2)}, {c: (1,0),(1,1)}
    maps = torch.tensor([[[1.0, 2.0, -4.0], [0.5, 0.25, 3.0]]])
    segments = torch.tensor([[[0, 0, 1], [2, 2, 1]]])
    monkeypatch.setattr(X, "slic_segments", lambda images, params: segments)
    got = superpixel_targets(maps, torch.zeros(1, 1, 2, 3), X.SuperpixelParams())
    # a: 1 + 2 = 3; b: -4 + 3 = -1; c: 0.5 + 0.25 = 0.75
    expected = torch.tensor([[[3.0, 3.0, -1.0], [0.75, 0.75, -1.0]]])
    assert torch.equal(got, expected)


def test_superpixel_targets_match_a_loop_over_real_slic_segments(tiny_data):
    images = tiny_data(2).images
    maps = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3))
    got = superpixel_targets(maps, images, X.SuperpixelParams(n_segments=5))
    seg = X.slic_segments(images, X.SuperpixelParams(n_segments=5))
    for i in range(2):
        for s in seg[i].unique():
            inside = seg[i] == s
            assert torch.allclose(got[i][inside], maps[i][inside].sum().expand(int(inside.sum())), atol=1e-5)


def test_kernel_shap_targets_are_its_superpixel_values_not_area_weighted(resnet, tiny_data):
    teacher, images, labels = resnet(), tiny_data(3).images, torch.tensor([0, 1, 2])
    p = from_dict(XDistillParams, {"explainer": "kernel_shap", "explainer_params": {"n_samples": 20},
                                     "superpixel": {"n_segments": 4}})  # fmt: skip
    got = X.teacher_targets(teacher, images, labels, p)
    with build_explainer(
        "kernel_shap", teacher, {"n_samples": 20, "batch_size": 64, "superpixel": {"n_segments": 4}}
    ) as e:
        ref = e.explain(images, labels).maps
    assert torch.equal(got, ref)


def test_target_normalisation_by_hand():
    t = torch.tensor([[[2.0, -4.0]], [[0.5, 1.0]]])
    assert torch.equal(normalise_targets(t, "dataset"), t / 4)
    assert torch.equal(normalise_targets(t, "image"), torch.tensor([[[0.5, -1.0]], [[0.5, 1.0]]]))
    assert torch.equal(normalise_targets(t, "none"), t)


# -- the CAE and the wrapper ---------------------------------------------------------------------


def test_cae_sizes_and_any_image_size():
    small = CAE(1, "small")
    assert sum(p.numel() for p in small.parameters()) == 1077  # Table I
    for size, shape in [("small", (2, 1, 18, 22)), ("large", (2, 3, 28, 28)), ("large", (1, 1, 16, 16))]:
        out = CAE(shape[1], size)(torch.rand(shape))
        assert out.shape == (shape[0], 1, *shape[2:])
        assert out.abs().max() <= 1  # tanh


def test_wrapper_replaces_the_classifier_and_keeps_the_student_intact(cnn, resnet):
    student = cnn()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    d = build_distiller("xdistill", student, resnet(), {"cae_grid": 7})
    w = d.student
    assert isinstance(w, XDistillStudent) and w.num_classes == 3
    assert isinstance(w.cnn.classifier, nn.Identity) and isinstance(student.classifier, nn.Linear)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert w.classifier.in_features == student.classifier.in_features + 49
    assert w(torch.rand(2, 1, 16, 16)).shape == (2, 3)
    assert default_layer(w) == "cnn." + default_layer(student)


def test_grad_cam_and_hooks_work_on_the_wrapper(cnn, resnet):
    w = build_distiller("xdistill", cnn(), resnet(), {"cae_grid": 16}).student
    x = torch.rand(3, 1, 16, 16)
    layer = default_layer(w)
    with capture_features(w, [layer]) as feats:
        w(x)
    real = w.cnn.blocks[2][1](w.cnn.blocks[2][0](w.cnn.blocks[1](w.cnn.blocks[0](x))))
    assert torch.allclose(feats[layer], real)
    assert all(not m._forward_hooks for m in w.modules())
    with build_explainer("grad_cam", w) as e:
        a = e.explain(x, torch.tensor([0, 1, 2]))
    assert a.maps.shape == (3, 16, 16) and a.layer == layer
    with pytest.raises(LayerNotFoundError, match=r"cnn\.blocks\.0\.0.*cae\.encoder"):
        with capture_features(w, ["cnn.nope"]):
            pass


def test_student_whose_last_linear_is_not_final_is_a_clear_error(resnet, context):
    class Sliced(nn.Module):  # its last Linear is followed by a slice: not the final layer
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.num_classes = nn.Conv2d(1, 2, 3), nn.Linear(392, 4), 3

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))[:, :3]

    d = build_distiller("xdistill", Sliced(), resnet(), {**FAST, "cae_grid": 4})
    with pytest.raises(ConfigError, match="last nn.Linear must be its final layer"):
        d.setup(context())
    with pytest.raises(ConfigError, match="has no nn.Linear"):
        build_distiller("xdistill", nn.Sequential(nn.Conv2d(1, 3, 3)), resnet())


# -- phase 1: cache -------------------------------------------------------------------------------


def test_targets_cached_hit_and_other_teacher_rebuilt(monkeypatch, cnn, resnet, context, tiny_data):
    calls = []
    real = X.teacher_targets

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(X, "teacher_targets", counting)
    d1 = build_distiller("xdistill", cnn(), resnet(1), FAST, context(key="teacher-a"))
    assert len(calls) == 1 and d1.cache_files["targets"].is_file() and d1.cache_files["cae"].is_file()
    assert d1.setup_reused_seconds == 0.0  # built now: its time is measured by the pipeline
    d2 = build_distiller("xdistill", cnn(), resnet(1), FAST, context(key="teacher-a"))
    assert len(calls) == 1  # cache hit: no explanations computed, CAE loaded
    # the reused artefacts still cost what building them took (stored in the files' metadata)
    built = [Cache.seconds(d1.cache_files[k]) for k in ("targets", "cae")]
    assert all(b > 0 for b in built) and d2.setup_reused_seconds == pytest.approx(sum(built))
    for a, b in zip(d1.student.cae.state_dict().values(), d2.student.cae.state_dict().values()):
        assert torch.equal(a, b)
    # another teacher has another file; plant teacher A's file there: detected by its stored key, rebuilt
    d3 = build_distiller("xdistill", cnn(), resnet(2), FAST, context(key="teacher-b"))
    assert len(calls) == 2 and d3.cache_files["targets"] != d1.cache_files["targets"]
    shutil.copyfile(d1.cache_files["targets"], d3.cache_files["targets"])
    shutil.copyfile(d1.cache_files["cae"], d3.cache_files["cae"])
    d4 = build_distiller("xdistill", cnn(), resnet(2), FAST, context(key="teacher-b"))
    assert len(calls) == 3
    stored = Cache.read(d4.cache_files["targets"], json_key(d4))
    assert stored is not None  # rewritten with teacher B's key
    expected = real(resnet(2), tiny_data().images, tiny_data().labels, from_dict(XDistillParams, FAST))
    assert torch.allclose(stored["targets"], expected)


def json_key(d):
    with safe_open(str(d.cache_files["targets"]), framework="pt") as f:
        key = f.metadata()["key"]
    assert '"teacher": "teacher-b"' in key
    return key


def test_max_images_selects_a_fixed_subset(monkeypatch, cnn, resnet, context):
    seen = []
    real = X.teacher_targets
    monkeypatch.setattr(X, "teacher_targets", lambda t, im, lab, p: seen.append(len(im)) or real(t, im, lab, p))
    build_distiller("xdistill", cnn(), resnet(), {**FAST, "max_images": 5}, context())
    assert seen == [5]
    assert torch.equal(X.select_indices(12, 5), X.select_indices(12, 5)) and len(X.select_indices(3, 5)) == 3


# -- phase 2: training --------------------------------------------------------------------------------


@pytest.fixture
def trained(cnn, resnet, context):
    """``trained(params=None, student=None)``: xdistill after setup, and its teacher (built in train mode)."""

    def make(params=None, student=None):
        teacher = resnet()
        teacher.train()
        d = build_distiller("xdistill", student or cnn(), teacher, {**FAST, **(params or {})}, context())
        return d, teacher

    return make


def test_cae_frozen_teacher_frozen_and_loss_decreases(fixed_batch, trained):
    d, teacher = trained({"lam": 1e-3})
    cae_before = {k: v.clone() for k, v in d.student.cae.state_dict().items()}
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.Adam([p for p in d.trainable_modules().parameters() if p.requires_grad], lr=1e-2)
    assert not any(p.requires_grad for p in d.student.cae.parameters())
    batch, losses = fixed_batch(), []
    d.train()
    for _ in range(8):
        _, terms = d(batch)
        assert set(terms) == {"ce", "kd", "fr"}
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert not d.student.cae.training and not teacher.training and d.student.cnn.training
    assert all(p.grad is None for p in d.student.cae.parameters())
    assert all(torch.equal(v, cae_before[k]) for k, v in d.student.cae.state_dict().items())
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_cifar_resnet_student_trains_one_step(resnet, fixed_batch, trained):
    d, _ = trained(student=resnet(5))
    opt = torch.optim.SGD([p for p in d.trainable_modules().parameters() if p.requires_grad], lr=0.05)
    _, terms = d(fixed_batch())
    sum(terms.values()).backward()
    opt.step()
    assert d.student.cnn_features == 16


def test_lambda_changes_only_the_cnn_branch_weight_penalty(cnn, resnet, fixed_batch, trained):
    d0, _ = trained({"lam": 0.0})
    lam = 0.05
    d1 = build_distiller("xdistill", cnn(), resnet(), {**FAST, "lam": lam})
    d1.student.load_state_dict(d0.student.state_dict())
    batch = fixed_batch()
    grads = []
    for d in (d0, d1):
        _, terms = d(batch)
        d.student.zero_grad()
        sum(terms.values()).backward()
        grads.append({n: p.grad.clone() for n, p in d.student.named_parameters() if p.requires_grad})
        if d is d0:
            assert float(terms["fr"].detach()) == 0.0
        else:
            c = d.student.classifier.weight[:, : d.student.cnn_features]
            assert float(terms["fr"].detach()) == pytest.approx(lam * float((c.detach() ** 2).sum()), rel=1e-6)
    n = d1.student.cnn_features
    for name, g0 in grads[0].items():
        diff = grads[1][name] - g0
        if name == "classifier.weight":
            c = d1.student.classifier.weight.detach()
            assert torch.allclose(diff[:, :n], 2 * lam * c[:, :n], atol=1e-6)  # d(lam ||c||^2)/dc
            assert torch.equal(diff[:, n:], torch.zeros_like(diff[:, n:]))  # CAE-branch weights: no penalty
        else:
            assert torch.equal(diff, torch.zeros_like(diff)), name


def test_loss_terms_match_hand_computation(fixed_batch, trained):
    d, _ = trained({"alpha": 0.6, "temperature": 2.0, "lam": 0.1})
    batch = fixed_batch(2)
    logits, terms = d(batch)
    zs, zt, y = logits.detach().tolist(), d.teacher(batch.images).tolist(), batch.labels.tolist()

    def softmax(v):
        e = [math.exp(a - max(v)) for a in v]
        return [a / sum(e) for a in e]

    ce = sum(-math.log(softmax(zs[i])[y[i]]) for i in range(2)) / 2  # by hand, in plain Python
    kl = 0.0
    for i in range(2):
        ps, pt = softmax([a / 2 for a in zs[i]]), softmax([a / 2 for a in zt[i]])
        kl += sum(b * math.log(b / a) for a, b in zip(ps, pt)) / 2
    c = d.student.classifier.weight[:, : d.student.cnn_features].detach().flatten().tolist()
    assert float(terms["ce"].detach()) == pytest.approx(ce, rel=1e-5)
    assert float(terms["kd"].detach()) == pytest.approx((1 - 0.6) * 2**2 * kl, rel=1e-4)
    assert float(terms["fr"].detach()) == pytest.approx(0.1 * sum(v * v for v in c), rel=1e-5)


def test_wrapper_state_dict_round_trip_without_setup(cnn, resnet, trained):
    d, _ = trained()
    rebuilt = build_distiller("xdistill", cnn(7), resnet(), FAST).student  # as pipeline.load_run_models does
    assert set(rebuilt.state_dict()) == set(d.student.state_dict())
    assert any(k.startswith("cae.") for k in rebuilt.state_dict())
    rebuilt.load_state_dict(d.student.state_dict())
    x = torch.rand(3, 1, 16, 16)
    d.student.eval()
    assert torch.equal(rebuilt.eval()(x), d.student(x))


@pytest.mark.parametrize(
    "params,match",
    [
        ({"temperature": 0}, "temperature must be > 0"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"lam": -1}, "lam"),
        ({"cae": "huge"}, "cae"),
        ({"explainer": "shapley"}, "registered explainers"),
        ({"explainer": "kernel_shap", "explainer_params": {"n_samples": 1}}, "n_samples"),
        ({"explainer_params": {"superpixel": {"n_segments": 4}}}, "top-level `superpixel`"),
        ({"superpixel": {"n_segments": 0}}, "n_segments"),
    ],
)
def test_bad_parameters_are_rejected(params, match, cnn, resnet):
    with pytest.raises(ConfigError, match=match):
        build_distiller("xdistill", cnn(), resnet(), params)


def test_setup_needs_training_data(cnn, resnet):
    d = build_distiller("xdistill", cnn(), resnet(), FAST)
    with pytest.raises(ConfigError, match="training split"):
        d.setup(DistillContext(sample=torch.zeros(2, 1, 16, 16)))
