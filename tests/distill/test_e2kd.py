"""e2KD (Parchami-Araghi et al., ECCV 2024) against an independent numpy implementation of the authors'
loss: ``w_gt CE + w_t (w_exp mean(1 - cos(GradCAM_S, GradCAM_T)) + w_logit T^2 KL(p_T || p_S))``,
both positive Grad-CAMs for the teacher's top-1 class, upsampled bilinearly to the image.

The reference needs no autograd: the explained layers are chosen so that the gradient of a logit with
respect to the layer is a weight of the (linear) head, read from the model: the student (kdfmv_cnn)
is explained at ``blocks`` (then flatten -> Linear: ``dz_c / dA_kij = W[c, (k, i, j)]``), the teacher
(cifar_resnet) at ``layer3`` (then global average pool -> Linear: ``dz_c / dA_kij = W[c, k] / (h w)``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xkd
import xkd.distill.e2kd as e2kd_module
from xkd.config import OptimizerConfig, TrainConfig
from xkd.data.base import Batch
from xkd.distill import build_distiller, distiller_params
from xkd.distill.base import DistillContext
from xkd.distill.e2kd import E2KD, grad_cam, upsample_maps
from xkd.errors import ConfigError, LayerNotFoundError
from xkd.explain.gradcam import GradCAM

pytestmark = pytest.mark.usefixtures("one_thread")

STUDENT_LAYER = "blocks"  # kdfmv_cnn's last max-pool output, (N, 8, 2, 2) for 16x16 inputs
# seeds whose untrained tiny models give non-zero positive Grad-CAMs on the test images
STUDENT_SEED, TEACHER_SEED = 2, 3


# ---------------------------------------------------------------------------------------------- reference


def np_bilinear(m: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of one (h, w) map to (size, size), half-pixel centres (align_corners=False)."""

    def axis(n_in: int):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, ry = axis(m.shape[0])
    c0, c1, cx = axis(m.shape[1])
    top = m[r0][:, c0] * (1 - cx) + m[r0][:, c1] * cx
    bottom = m[r1][:, c0] * (1 - cx) + m[r1][:, c1] * cx
    return top * (1 - ry)[:, None] + bottom * ry[:, None]


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_zscore(z: np.ndarray) -> np.ndarray:
    return (z - z.mean(axis=1, keepdims=True)) / (1e-7 + z.std(axis=1, ddof=1, keepdims=True))


def features(student, teacher, x):
    """Explained-layer activations and logits, by calling the models' parts directly (no hooks)."""
    with torch.no_grad():
        a_s = student.blocks(x)
        t = teacher.relu(teacher.bn1(teacher.conv1(x)))
        a_t = teacher.layer3(teacher.layer2(teacher.layer1(t)))
        return [v.double().numpy() for v in (a_s, a_t, student(x), teacher(x))]


def reference_cams(student, teacher, x):
    """Positive Grad-CAMs of both models for the teacher's top-1 class, at the image size."""
    a_s, a_t, _, zt = features(student, teacher, x)
    c = zt.argmax(axis=1)
    n, k_s, h_s, w_s = a_s.shape
    w_student = student.classifier.weight.detach().double().numpy()[c].reshape(n, k_s, h_s, w_s).mean(axis=(2, 3))
    w_teacher = teacher.fc.weight.detach().double().numpy()[c] / (a_t.shape[2] * a_t.shape[3])
    cam_s = np.maximum((w_student[:, :, None, None] * a_s).sum(axis=1), 0)
    cam_t = np.maximum((w_teacher[:, :, None, None] * a_t).sum(axis=1), 0)
    size = x.shape[-1]
    return np.stack([np_bilinear(m, size) for m in cam_s]), np.stack([np_bilinear(m, size) for m in cam_t])


def reference_terms(student, teacher, x, y, p: dict) -> dict[str, float]:
    _, _, zs, zt = features(student, teacher, x)
    ms, mt = reference_cams(student, teacher, x)
    s, t = ms.reshape(len(x), -1), mt.reshape(len(x), -1)
    cos = (s * t).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))
    temp = p["temperature"]
    if p.get("standardize"):
        zs_, zt_ = np_zscore(zs), np_zscore(zt)
    else:
        zs_, zt_ = zs, zt
    log_ps, log_pt = np_log_softmax(zs_ / temp), np_log_softmax(zt_ / temp)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean()
    ce = -np_log_softmax(zs)[np.arange(len(y)), y.numpy()].mean()
    return {
        "ce": p["ce_weight"] * ce,
        "exp": p["teacher_weight"] * p["exp_weight"] * (1 - cos).mean(),
        "kd": p["teacher_weight"] * p["logit_weight"] * temp * temp * kl,
    }


@pytest.fixture
def pair(tiny_model):
    return tiny_model("student", STUDENT_SEED), tiny_model("teacher", TEACHER_SEED)


@pytest.fixture
def data(tiny_data):
    return tiny_data(12)


PARAMS = {"ce_weight": 0.5, "teacher_weight": 2.0, "exp_weight": 3.0, "logit_weight": 0.7, "temperature": 2.0}


# ---------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("standardize", [False, True])
def test_terms_equal_the_reference_formula(pair, data, standardize):
    student, teacher = pair
    params = {**PARAMS, "layer": STUDENT_LAYER, "standardize": standardize}
    d = build_distiller("e2kd", student, teacher, params)
    batch = data.batch(torch.arange(8))
    ms, mt = reference_cams(student, teacher, batch.images)
    assert (ms.reshape(8, -1).max(1) > 0).sum() >= 6 and (mt.reshape(8, -1).max(1) > 0).all()  # non-trivial maps
    _, terms = d(batch)
    assert set(terms) == {"ce", "exp", "kd"}
    ref = reference_terms(student, teacher, batch.images, batch.labels, params)
    for k in ("ce", "exp", "kd"):
        assert float(terms[k].detach()) == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
    assert 0.0 < ref["exp"] < params["teacher_weight"] * params["exp_weight"]


def test_default_weights_and_layers(pair, data):
    student, teacher = pair
    d = build_distiller("e2kd", student, teacher)
    assert (d.student_layer, d.teacher_layer) == ("blocks.2.1", "layer3")  # the models' Grad-CAM layers
    p = d.params
    assert (p.ce_weight, p.teacher_weight, p.exp_weight, p.logit_weight, p.temperature) == (1, 1, 1, 1, 1)
    assert (p.frozen_explanations, p.guided_step_interval, p.standardize) == (False, 1, False)


@pytest.mark.parametrize("role,layer", [("student", "blocks.2.1"), ("student", "blocks.1.0"), ("teacher", "layer3")])
def test_grad_cam_agrees_with_the_grad_cam_explainer(pair, data, role, layer):
    model = pair[0] if role == "student" else pair[1]
    model.eval()
    x = data.images[:8]
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with GradCAM(model, {"layer": layer}) as gc:
        expected = gc.explain(x, targets).maps
        top1 = gc.explain(x, None).maps
    logits, cams = grad_cam(model, layer, x, targets)
    assert torch.equal(logits, model(x).detach())
    assert cams.shape[1:] != x.shape[2:]  # maps at the layer's resolution
    torch.testing.assert_close(upsample_maps(cams, x.shape[2:]), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(upsample_maps(grad_cam(model, layer, x)[1], x.shape[2:]), top1, rtol=1e-5, atol=1e-7)
    # with a graph: the same numbers
    _, with_graph = grad_cam(model, layer, x, targets, create_graph=True)
    assert with_graph.requires_grad
    torch.testing.assert_close(with_graph.detach(), cams, rtol=1e-5, atol=1e-7)


def test_live_maps_are_fp32_under_autocast(pair, data):
    # frozen teacher maps are computed without autocast; live ones under amp: auto (bf16 on a GPU) are
    # computed in fp32 from the bf16 activations and gradients, so the two compare alike
    model = pair[1].eval()
    x, targets = data.images[:6], torch.tensor([0, 1, 2, 0, 1, 2])
    _, exact = grad_cam(model, "layer3", x, targets)
    for create_graph in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, mixed = grad_cam(model, "layer3", x, targets, create_graph=create_graph)
        assert mixed.dtype == torch.float32
        assert (mixed.detach() - exact).abs().max() < 0.05 * exact.abs().max() + 1e-6


def test_explanation_term_trains_the_student_through_its_gradients(pair, data):
    student, teacher = pair
    d = build_distiller("e2kd", student, teacher, {**PARAMS, "layer": STUDENT_LAYER})
    d.train()
    batch = data.batch(torch.arange(8))
    _, terms = d(batch)
    terms["exp"].backward()
    grad = lambda p: torch.zeros_like(p) if p.grad is None else p.grad.clone()  # noqa: E731
    got = {n: grad(p) for n, p in student.named_parameters()}
    assert student.classifier.bias.grad is None  # dz/dA does not depend on the bias
    assert all(p.grad is None for p in teacher.parameters())  # frozen: no gradient reaches the teacher
    # the classifier enters the map only through dz/dA: a non-zero gradient needs the double backward
    assert got["classifier.weight"].abs().sum() > 0 and got["blocks.0.0.weight"].abs().sum() > 0

    # the same gradients from the analytic form of the maps, differentiated by plain autograd
    student.zero_grad()
    x = batch.images
    with torch.no_grad():
        c = teacher(x).argmax(1)
    _, mt = reference_cams(student, teacher, x)
    a = student.blocks(x)
    w = student.classifier.weight[c].view(a.shape).mean(dim=(2, 3))
    cam = F.relu((w[:, :, None, None] * a).sum(1))
    up = F.interpolate(cam[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    cos = F.cosine_similarity(up.flatten(1), torch.tensor(mt, dtype=torch.float32).flatten(1), dim=1)
    (PARAMS["teacher_weight"] * PARAMS["exp_weight"] * (1 - cos).mean()).backward()
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], grad(p), rtol=1e-3, atol=1e-6, msg=n)


def test_no_grad_gives_the_same_terms_without_a_graph(pair, data):
    student, teacher = pair
    d = build_distiller("e2kd", student, teacher, {**PARAMS, "layer": STUDENT_LAYER})
    batch = data.batch(torch.arange(6))
    d.train()
    _, with_grad = d(batch)
    with torch.no_grad():
        _, without = d(batch)
    assert d.counter.count == 1  # only the training pass with gradients counts as a step
    for k in with_grad:
        assert not without[k].requires_grad
        torch.testing.assert_close(without[k], with_grad[k].detach())


# ---------------------------------------------------------------------------------------------- frozen


def context(data, tmp_path, key="teacher-a"):
    return DistillContext(sample=torch.zeros(2, 1, 16, 16), train=data, cache_dir=tmp_path, teacher_key=key)


def count_teacher_images(teacher) -> list[int]:
    seen: list[int] = []
    teacher.register_forward_pre_hook(lambda m, args: seen.append(int(args[0].shape[0])))
    return seen


@pytest.mark.parametrize("standardize", [False, True])
def test_frozen_explanations_give_the_live_loss(pair, data, tmp_path, standardize):
    student, teacher = pair
    params = {**PARAMS, "layer": STUDENT_LAYER, "standardize": standardize}
    live = build_distiller("e2kd", student, teacher, params)
    frozen = build_distiller(
        "e2kd",
        student,
        teacher,
        {**params, "frozen_explanations": True, "explain_batch_size": 5},
        context(data, tmp_path),
    )
    assert frozen.frozen_cams.shape == (12, 4, 4)  # stored at the teacher layer's resolution
    seen = count_teacher_images(teacher)
    batch = data.batch(torch.tensor([7, 2, 11, 0, 5]))
    live.train(), frozen.train()
    _, expected = live(batch)
    n_live = len(seen)
    _, got = frozen(batch)
    assert n_live >= 1 and len(seen) == n_live  # the frozen distiller did not run the teacher
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    got["exp"].backward()
    assert student.classifier.weight.grad.abs().sum() > 0
    # a batch without indices (built by hand) is explained live
    _, by_hand = frozen(Batch(batch.images, batch.labels))
    torch.testing.assert_close(by_hand["exp"], expected["exp"], rtol=1e-5, atol=1e-6)


def test_in_evaluation_mode_the_frozen_variant_explains_live(pair, data, tmp_path):
    # a validation batch's indices are not the training set's: reading the cache by them would pair
    # its images with other images' teacher logits and maps
    student, teacher = pair
    params = {**PARAMS, "layer": STUDENT_LAYER}
    live = build_distiller("e2kd", student, teacher, params)
    frozen = build_distiller("e2kd", student, teacher, {**params, "frozen_explanations": True}, context(data, tmp_path))
    other = type(data)(data.images.flip(-1)[:5], data.labels[:5])  # other images, indices 0..4
    batch = other.batch(torch.arange(5))
    live.eval(), frozen.eval()
    _, expected = live(batch)
    _, got = frozen(batch)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    frozen.train()
    _, cached = frozen(data.batch(torch.arange(5)))  # in training it reads the cache (checked)
    assert frozen._checked


def test_frozen_explanations_are_cached_and_reused(pair, data, tmp_path):
    student, teacher = pair
    params = {"layer": STUDENT_LAYER, "frozen_explanations": True}
    seen = count_teacher_images(teacher)
    first = build_distiller("e2kd", student, teacher, params, context(data, tmp_path))
    assert sum(seen) == 2 + 12  # the dry run (2 images) and the 12 training images
    assert first.cache_file is not None and first.cache_file.is_file()
    assert first.cache_file.parent == tmp_path / "e2kd"
    seen.clear()
    second = build_distiller("e2kd", student, teacher, params, context(data, tmp_path))
    assert seen == [2]  # only the dry run: the explanations came from the cache
    assert second.cache_file == first.cache_file and second.setup_reused_seconds > 0
    assert torch.equal(second.frozen_cams, first.frozen_cams)
    assert torch.equal(second.frozen_logits, first.frozen_logits)
    # another teacher (key) or other images: a new entry
    seen.clear()
    other = build_distiller("e2kd", student, teacher, params, context(data, tmp_path, key="teacher-b"))
    assert sum(seen) > 2 and other.cache_file != first.cache_file
    seen.clear()
    shifted = type(data)(data.images.flip(-1), data.labels)
    flipped = build_distiller("e2kd", student, teacher, params, context(shifted, tmp_path))
    assert sum(seen) > 2 and flipped.cache_file not in (first.cache_file, other.cache_file)
    # without a cache folder nothing is written
    none = build_distiller(
        "e2kd", student, teacher, params, DistillContext(sample=torch.zeros(2, 1, 16, 16), train=data)
    )
    assert none.cache_file is None and torch.equal(none.frozen_cams, first.frozen_cams)


def test_frozen_explanations_refuse_augmented_images(pair, data, tmp_path):
    student, teacher = pair
    d = build_distiller("e2kd", student, teacher, {"frozen_explanations": True}, context(data, tmp_path))
    d.train()
    batch = data.batch(torch.arange(4))
    flipped = Batch(batch.images.flip(-1), batch.labels, indices=batch.indices)
    with pytest.raises(ConfigError, match="augmentation"):
        d(flipped)
    d(batch)  # the un-augmented batch passes the check
    assert d._checked


def test_frozen_needs_the_training_split(pair):
    with pytest.raises(ConfigError, match="training split"):
        build_distiller("e2kd", *pair, {"frozen_explanations": True}, DistillContext(sample=torch.zeros(2, 1, 16, 16)))


def test_frozen_variant_never_runs_the_teacher_while_training(tmp_path, tiny_pair, tiny_data, device):
    """The contract of tests/distill/test_contract.py for the frozen variant (its CASES hold one entry
    per registered name): the teacher stays frozen and in eval mode and is not run at all."""
    student, teacher = (m.to(device) for m in tiny_pair)
    teacher.train()
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    ctx = DistillContext(
        sample=torch.zeros(2, 1, 16, 16), train=tiny_data(16), cache_dir=tmp_path, teacher_key="c", device=device
    )
    d = xkd.build_distiller("e2kd", student, teacher, {"frozen_explanations": True}, ctx)
    assert d.frozen_cams.device.type == device.type
    seen = count_teacher_images(teacher)
    before = {k: v.detach().cpu().clone() for k, v in d.trainable_modules().named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=8, optimizer=OptimizerConfig("sgd", lr=0.05), max_steps_per_epoch=2)
    result = xkd.Trainer(d, tiny_data(16), tiny_data(6), cfg, device=device, progress=False).fit()
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    assert set(result.history[0]["terms"]) == {"ce", "exp", "kd"}
    assert seen == []
    changed = [k for k, v in d.trainable_modules().named_parameters() if not torch.equal(v.detach().cpu(), before[k])]
    assert changed
    assert not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, weights[k])


# ---------------------------------------------------------------------------------------------- guided steps


def test_guided_step_interval_applies_the_explanation_term_every_kth_step(pair, data, monkeypatch):
    student, teacher = pair
    params = {**PARAMS, "layer": STUDENT_LAYER}
    batch = data.batch(torch.arange(8))
    _, full = build_distiller("e2kd", student, teacher, params)(batch)
    d = build_distiller("e2kd", student, teacher, {**params, "guided_step_interval": 3})
    calls: list[bool] = []
    real = e2kd_module.grad_cam

    def counting(*args, **kwargs):
        calls.append(kwargs.get("create_graph", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(e2kd_module, "grad_cam", counting)
    d.train()
    exp, explained = [], []
    for _ in range(7):
        calls.clear()
        _, terms = d(batch)
        exp.append(float(terms["exp"].detach()))
        explained.append(len(calls))
        torch.testing.assert_close(terms["kd"], full["kd"])  # the logit term on every step
    assert explained == [2, 0, 0, 2, 0, 0, 2]  # teacher and student maps on steps 1, 4, 7 only
    assert exp[0] == exp[3] == exp[6] == pytest.approx(float(full["exp"].detach()), rel=1e-6)
    assert exp[1] == exp[2] == exp[4] == exp[5] == 0.0
    d.eval()  # outside training every pass explains
    assert float(d(batch)[1]["exp"].detach()) == pytest.approx(exp[0], rel=1e-6)
    # the step counter is checkpointed with the student, so a resumed run keeps the rhythm
    modules = d.trainable_modules()
    assert set(modules) == {"student", "e2kd_state"}
    fresh = build_distiller("e2kd", student, teacher, {**params, "guided_step_interval": 3})
    fresh.trainable_modules().load_state_dict(modules.state_dict())
    assert fresh.counter.count == 7
    fresh.train()
    assert fresh(batch)[1]["exp"].item() == 0.0  # step 8
    assert set(build_distiller("e2kd", student, teacher).trainable_modules()) == {"student"}


def test_an_e2kd_step_never_waits_for_the_host(pair, data, device, no_host_sync):
    student, teacher = pair
    params = {**PARAMS, "layer": STUDENT_LAYER, "guided_step_interval": 2}
    d = build_distiller("e2kd", student, teacher, params).to(device)
    batch = data.batch(torch.arange(6)).to(device)
    d.train()
    d(batch)  # warm-up; step 1 explains
    with no_host_sync(device):  # the guided-step rhythm is counted on the host
        _, plain = d(batch)  # step 2: the logit terms only
        _, guided = d(batch)  # step 3: explains again
    assert float(plain["exp"]) == 0.0 and float(guided["exp"]) > 0.0


def test_zero_explanation_weight_explains_nothing(pair, data, monkeypatch):
    calls = []
    monkeypatch.setattr(e2kd_module, "grad_cam", lambda *a, **k: calls.append(1))
    d = build_distiller("e2kd", *pair, {"exp_weight": 0.0})
    _, terms = d(data.batch(torch.arange(4)))
    assert calls == [] and float(terms["exp"]) == 0.0


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "params,match",
    [
        ({"exp_weight": -1.0}, "exp_weight must be >= 0"),
        ({"ce_weight": -0.1}, "ce_weight must be >= 0"),
        ({"teacher_weight": float("nan")}, "teacher_weight must be >= 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"guided_step_interval": 0}, "guided_step_interval must be >= 1"),
        ({"explain_batch_size": 0}, "explain_batch_size must be >= 1"),
        ({"layer": ""}, "layer must be a module path"),
        ({"frozen_explanations": "yes"}, "expected true or false"),
        ({"standardize": 1}, "expected true or false"),
        ({"explanation": "grad_cam"}, "explanation"),
    ],
)
def test_bad_params_are_config_errors(params, match):
    with pytest.raises(ConfigError, match=match):
        distiller_params("e2kd", params)


def test_models_without_a_conv_layer_are_refused_before_training(tiny_model):
    flat = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))
    with pytest.raises(ConfigError, match="student.*no nn.Conv2d"):
        build_distiller("e2kd", flat, tiny_model("teacher", 0))
    with pytest.raises(ConfigError, match="teacher.*no nn.Conv2d"):
        build_distiller("e2kd", tiny_model("student", 0), nn.Sequential(nn.Flatten(), nn.Linear(256, 3)))


class SideBranch(nn.Module):
    """A model with a convolution that runs but does not feed the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.side, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        self.side(x)  # computed and dropped
        return self.fc(self.main(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("create_graph", [False, True])
def test_a_layer_that_does_not_feed_the_logits_is_one_clear_error(create_graph):
    model, x = SideBranch(), torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="layer 'side' of SideBranch does not feed its logits"):
        grad_cam(model, "side", x, create_graph=create_graph)
    _, cams = grad_cam(model, "main", x, create_graph=create_graph)
    assert cams.shape == (2, 6, 6)


def test_preflight_names_a_layer_that_gives_no_map(pair):
    d = build_distiller("e2kd", *pair, {"layer": "classifier"})
    with pytest.raises(ConfigError, match=r"e2kd student: layer 'classifier' must output an \(N, K, h, w\)"):
        d.preflight(torch.zeros(2, 1, 16, 16))
    build_distiller("e2kd", *pair).preflight(torch.zeros(2, 1, 16, 16))  # the default layers pass
    with pytest.raises(LayerNotFoundError, match="nope"):
        build_distiller("e2kd", *pair, {"teacher_layer": "nope"})


def test_e2kd_is_registered_and_keeps_the_teacher_frozen(pair):
    student, teacher = pair
    teacher.train()
    d = build_distiller("e2kd", student, teacher)
    assert isinstance(d, E2KD) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    d.train()
    assert not any(m.training for m in teacher.modules())
