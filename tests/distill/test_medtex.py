"""MED-TEX / MED-EX (explainer Θ, student on Θ ⊙ X, VID terms) and the ``medtex_theta`` explainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xkd.config import ConfigError
from xkd.data.base import Batch
from xkd.distill.base import DistillContext, build_distiller
from xkd.distill.medtex import (
    ExplainerNet,
    MaskedStudent,
    MedEx,
    MedTex,
    conv_blocks,
    default_layer_pairs,
    teacher_cross_entropy,
)
from xkd.engine.checkpoint import load_checkpoint, load_weights, model_weights, save_checkpoint
from xkd.explain import build_explainer
from xkd.explain.theta import MedTexTheta, ThetaUnavailableError
from xkd.models.hooks import LayerNotFoundError, capture_features, default_layer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def medtex(tiny_model):
    """``medtex(name="medtex", params=None, channels=1, size=16)``: the distiller after setup, on the tiny models."""

    def make(name: str = "medtex", params: dict | None = None, channels: int = 1, size: int = 16):
        ctx = DistillContext(sample=torch.zeros(2, channels, size, size))
        student = tiny_model("student", channels=channels, size=size)
        teacher = tiny_model("teacher", channels=channels, size=size)
        return build_distiller(name, student, teacher, params, ctx)

    return make


def batch(n: int = 8, channels: int = 1, size: int = 16) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(torch.rand(n, channels, size, size, generator=g), torch.randint(0, 3, (n,), generator=g))


# -- the explainer network and the wrapper -----------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 16, 16), (1, 15, 17), (3, 9, 13), (1, 1, 1)])
def test_theta_in_unit_interval_with_the_shape_of_x(shape):
    e = ExplainerNet(shape[0])
    x = torch.rand(2, *shape) * 4 - 2
    theta = e(x)
    assert theta.shape == x.shape
    assert float(theta.detach().min()) >= 0.0 and float(theta.detach().max()) <= 1.0


def test_student_sees_theta_times_x_and_hooked_features_are_the_real_ones(medtex):
    d = medtex()
    wrapper, inner = d.student, d.student.student
    x = batch().images
    seen = {}
    h = inner.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))
    try:
        d.eval()
        with torch.no_grad():
            d(Batch(x, torch.zeros(8, dtype=torch.long)))
    finally:
        h.remove()
    x_prime = wrapper.theta(x) * x
    assert torch.allclose(seen["x"], x_prime)
    with torch.no_grad():
        assert torch.allclose(wrapper(x), inner(x_prime))
    # the VID hooks saw the inner student's real block outputs on X' and are gone afterwards
    with torch.no_grad(), capture_features(inner, ["blocks.0"]) as feats:
        wrapper(x)
        assert torch.allclose(feats["blocks.0"], inner.blocks[0](x_prime))
    for m in list(inner.modules()) + list(d.teacher.modules()):
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_wrapper_exposes_classes_and_default_layer_for_grad_cam(medtex):
    d = medtex()
    assert d.student.num_classes == 3
    assert default_layer(d.student) == "student.blocks.2.1"
    x = batch(4).images
    with build_explainer("grad_cam", d.student) as ex:
        a = ex.explain(x, torch.tensor([0, 1, 2, 0]))
    assert a.layer == "student.blocks.2.1" and a.maps.shape == (4, 16, 16)
    assert sorted(d.trainable_modules()) == ["student", "vid"]


# -- loss against a hand computation ------------------------------------------------------------------


class Tiny(nn.Module):
    """``feat``: a 1x1 identity conv (the hooked layer); logits: a fixed linear map of the feature."""

    def __init__(self, rows):
        super().__init__()
        self.feat = nn.Conv2d(1, 1, 1)
        self.fc = nn.Linear(4, 2, bias=False)
        self.num_classes = 2
        with torch.no_grad():
            self.feat.weight.fill_(1.0)
            self.feat.bias.zero_()
            self.fc.weight.copy_(torch.tensor(rows))

    def forward(self, x):
        return self.fc(self.feat(x).flatten(1))


def test_medtex_loss_matches_hand_computation():
    x = torch.tensor([[[[0.2, 0.4], [0.6, 0.8]]]])
    s = Tiny([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    t = Tiny([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    params = {"layers": [["feat", "feat"]], "lam": 0.01, "explainer_widths": [2], "vid_mid_channels": 1}
    d = build_distiller("medtex", s, t, params, DistillContext(sample=torch.zeros(1, 1, 2, 2)))
    vid = d.vid[0]
    with torch.no_grad():
        d.student.explainer.head.weight.zero_()  # Theta = sigmoid(0) = 0.5 everywhere
        d.student.explainer.head.bias.zero_()
        for conv in (vid.regressor[0], vid.regressor[2]):  # mu(s) = relu(s) = s here
            conv.weight.fill_(1.0)
            conv.bias.zero_()
        vid.log_scale.fill_(0.0)  # sigma^2 = softplus(0) + eps = ln 2 + 1e-5
    _, terms = d(Batch(x, torch.tensor([0])))
    # X' = 0.5 X = (0.1, 0.2, 0.3, 0.4); student logits (sum X', 0) = (1, 0); teacher logits (0, sum X) = (0, 2)
    p_t = [1 / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))]
    log_q = [-math.log(1 + math.exp(-1)), -math.log(1 + math.exp(1))]
    ce = -(p_t[0] * log_q[0] + p_t[1] * log_q[1])  # 0.119203 * 0.313262 + 0.880797 * 1.313262
    assert ce == pytest.approx(1.194059, abs=1e-6)
    # VID (eq. 6 with log sigma): T - mu = X - X' = (0.1, 0.2, 0.3, 0.4), squares sum to 0.30
    var = math.log(2) + 1e-5
    vid_sum = 4 * 0.5 * math.log(var) + 0.30 / (2 * var)  # 2 * (-0.366499) + 0.216402
    assert vid_sum == pytest.approx(-0.516596, abs=1e-6)
    assert set(terms) == {"ce_teacher", "vid"}
    assert float(terms["ce_teacher"].detach()) == pytest.approx(ce, rel=1e-5)
    assert float(terms["vid"].detach()) == pytest.approx(0.01 * vid_sum, rel=1e-5)


def test_teacher_cross_entropy_is_eq2_and_scales_with_temperature():
    zs, zt = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert float(teacher_cross_entropy(zs, zt)) == pytest.approx(1.194059, abs=1e-6)
    expected = 4 * float(teacher_cross_entropy(zs / 2, zt / 2))
    assert float(teacher_cross_entropy(zs, zt, 2.0)) == pytest.approx(expected, rel=1e-6)


# -- MED-TEX's student-only ablation -------------------------------------------------------------------


def test_student_only_is_eq2_on_raw_x_against_the_teacher_not_the_labels():
    """Seed 001, §3: "the student (only) without the explainer and intermediate layer losses, which is
    only trained on the input image X" -- what remains of eq. 7 is L^N on X, the cross-entropy to
    the teacher's distribution."""
    x = torch.tensor([[[[0.2, 0.4], [0.6, 0.8]]]])
    s = Tiny([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    t = Tiny([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    d = build_distiller("medtex_student_only", s, t, None, DistillContext(sample=torch.zeros(1, 1, 2, 2)))
    assert d.student is s  # no explainer in front of it: it sees X itself
    assert sorted(d.trainable_modules()) == ["student"]
    logits, terms = d(Batch(x, torch.tensor([0])))
    # raw X: student logits (sum X, 0) = (2, 0), teacher logits (0, sum X) = (0, 2)
    p_t = [1 / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))]
    log_q = [-math.log(1 + math.exp(-2)), -math.log(1 + math.exp(2))]
    ce = -(p_t[0] * log_q[0] + p_t[1] * log_q[1])  # 0.119203 * 0.126928 + 0.880797 * 2.126928
    assert ce == pytest.approx(1.888522, abs=1e-6)
    assert torch.equal(logits.detach(), torch.tensor([[2.0, 0.0]]))
    assert set(terms) == {"ce_teacher"}
    assert float(terms["ce_teacher"].detach()) == pytest.approx(ce, rel=1e-6)
    # the true labels are not read: another label gives the same loss (scratch's CE to label 0
    # would be log(1 + e^-2) = 0.126928, to label 1 2.126928)
    _, other = d(Batch(x, torch.tensor([1])))
    assert float(other["ce_teacher"].detach()) == pytest.approx(ce, rel=1e-6)


def test_student_only_reads_only_the_teacher_logits_and_keeps_the_teacher_frozen(tiny_model):
    student, teacher = tiny_model("student", 0), tiny_model("teacher", 1)
    teacher.train()
    d = build_distiller("medtex_student_only", student, teacher, {"temperature": 2.0})
    assert d.teacher_logits_only and not d.teacher.training
    assert all(not p.requires_grad for p in d.teacher.parameters())
    b = batch(4)
    _, terms = d(b)
    with torch.no_grad():
        expected = teacher_cross_entropy(student(b.images), teacher(b.images), 2.0)
    assert float(terms["ce_teacher"].detach()) == pytest.approx(float(expected), rel=1e-5)
    # cached logits (one row per training image, read by index) stand in for the teacher
    cached = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    d.use_teacher_logits(cached)
    idx = torch.tensor([4, 0, 2, 3])
    _, terms = d(Batch(b.images, b.labels, indices=idx))
    with torch.no_grad():
        expected = teacher_cross_entropy(student(b.images), cached[idx], 2.0)
    assert float(terms["ce_teacher"].detach()) == pytest.approx(float(expected), rel=1e-5)
    terms["ce_teacher"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        build_distiller("medtex_student_only", student, teacher, {"temperature": 0})
    with pytest.raises(ConfigError, match="unknown key 'params.explainer_widths'"):
        build_distiller("medtex_student_only", student, teacher, {"explainer_widths": [4]})


def test_the_lesion_comparison_trains_its_student_only_ablation_on_the_teacher():
    from pathlib import Path

    from xkd.plan import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "medtex_lesions.yaml")
    by_name = {s.name: s.distiller for s in cfg.students}
    assert by_name["student_only"] == "medtex_student_only"
    assert "scratch" not in by_name.values()


# -- training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["medtex", "medex"])
def test_joint_training_decreases_loss_and_keeps_teacher_frozen(name, medtex):
    d = medtex(name)
    d.teacher.train()
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    d.train()
    assert not d.teacher.training and d.student.training
    b = batch()
    opt = torch.optim.Adam(d.trainable_modules().parameters(), lr=1e-2)
    losses = []
    for step in range(8):
        _, terms = d(b)
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        if step == 0:  # explainer and student (and VID) all get gradients: they are trained jointly
            for part in [d.student.explainer, d.student.student, *([d.vid] if name == "medtex" else [])]:
                grads = [p.grad for p in part.parameters()]
                assert all(g is not None for g in grads), type(part).__name__
                assert sum(float(g.abs().sum()) for g in grads) > 0, type(part).__name__
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    assert not d.teacher.training
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())


def test_medex_has_no_intermediate_losses(medtex):
    d = medtex("medex")
    _, terms = d(batch(4))
    assert set(terms) == {"ce_teacher"}
    assert sorted(d.trainable_modules()) == ["student"]
    assert isinstance(d, MedEx) and not isinstance(d, MedTex)
    with pytest.raises(ConfigError, match="unknown key 'params.lam'"):
        medtex("medex", {"lam": 0.01})
    _, terms = medtex("medtex", {"lam": 0.0})(batch(4))  # lam = 0: MED-TEX reduces to MED-EX
    assert set(terms) == {"ce_teacher"}


def test_wrapper_state_dict_round_trip_through_a_checkpoint(tmp_path, medtex, tiny_model):
    d = medtex()
    opt = torch.optim.Adam(d.trainable_modules().parameters(), lr=1e-2)
    _, terms = d(batch())
    sum(terms.values()).backward()
    opt.step()
    save_checkpoint(tmp_path / "best.pt", {"model": d.trainable_modules().state_dict(), "epoch": 1})
    torch.manual_seed(123)  # a differently initialised rebuild, without setup (as pipeline.load_run_models)
    fresh = build_distiller("medtex", tiny_model("student"), tiny_model("teacher")).student
    load_weights(fresh, model_weights(load_checkpoint(tmp_path / "best.pt")), "best.pt")
    x = batch(4).images
    d.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), d.student(x))
        assert torch.equal(fresh.theta(x), d.student.theta(x))
    assert sorted({k.split(".")[0] for k in fresh.state_dict()}) == ["explainer", "student"]


# -- layers ---------------------------------------------------------------------------------------------


def test_default_pairs_are_conv_blocks_matched_by_depth(medtex, tiny_model):
    assert conv_blocks(tiny_model("student")) == ["blocks.0", "blocks.1", "blocks.2"]
    assert conv_blocks(tiny_model("teacher")) == ["layer1", "layer2", "layer3"]  # the stem conv1 is left out
    five = tiny_model("student", widths=[2, 2, 2, 2, 2])
    assert default_layer_pairs(five, tiny_model("teacher")) == [
        ("blocks.0", "layer1"),
        ("blocks.2", "layer2"),
        ("blocks.4", "layer3"),
    ]
    assert medtex().pairs == [("blocks.0", "layer1"), ("blocks.1", "layer2"), ("blocks.2", "layer3")]


def test_unknown_layer_lists_module_paths(medtex):
    with pytest.raises(LayerNotFoundError, match=r"'blocks\.9' not found.*blocks\.0\.0"):
        medtex(params={"layers": [["blocks.9", "layer3"]]})
    with pytest.raises(LayerNotFoundError, match=r"'nope' not found.*layer1"):
        medtex(params={"layers": [["blocks.2", "nope"]]})


def test_spatial_mismatch_resamples_the_student_map_and_non_maps_are_an_error(medtex):
    # blocks.0 gives 8x8 maps, the teacher's layer1 16x16: the student map is resampled bilinearly
    d = medtex(params={"layers": [["blocks.0", "layer1"], ["blocks.2", "layer1"]]})
    _, terms = d(batch(4))
    assert torch.isfinite(terms["vid"])
    with pytest.raises(ValueError, match=r"'classifier' outputs shape \(2, 3\).*\(N, C, H, W\)"):
        medtex(params={"layers": [["classifier", "layer3"]]})


def test_forward_without_setup_is_a_clear_error(tiny_model):
    d = build_distiller("medtex", tiny_model("student"), tiny_model("teacher"))
    with pytest.raises(RuntimeError, match="setup"):
        d(batch(2))


@pytest.mark.parametrize(
    "params,match",
    [
        ({"temperature": 0}, "temperature must be > 0"),
        ({"lam": -0.1}, "lam must be >= 0"),
        ({"alpha": 0.5}, "unknown key 'params.alpha'"),
        ({"layers": [["blocks.0"]]}, r"layers\[0\] must be a pair"),
        ({"explainer_widths": [8, 0]}, "explainer_widths must be positive"),
        ({"vid_init_pred_var": 0.0}, "vid_init_pred_var must be > 0"),
        ({"vid_reduction": "max"}, "not allowed"),
    ],
)
def test_bad_parameters_are_rejected(params, match, tiny_model):
    with pytest.raises(ConfigError, match=match):
        build_distiller("medtex", tiny_model("student"), tiny_model("teacher"), params)


def test_works_for_rgb_odd_sized_images(medtex):
    d = medtex(channels=3, size=15)
    logits, terms = d(batch(2, channels=3, size=15))
    assert logits.shape == (2, 3) and all(torch.isfinite(v) for v in terms.values())


# -- the medtex_theta explainer ---------------------------------------------------------------------------


def test_theta_explainer_returns_channel_mean_of_theta(tiny_model):
    wrapper = MaskedStudent(ExplainerNet(3, [4, 8]), tiny_model("student", channels=3))
    x = batch(5, channels=3).images
    with build_explainer("medtex_theta", wrapper, {"batch_size": 2}) as ex:
        assert isinstance(ex, MedTexTheta)
        a = ex.explain(x, None)
    with torch.no_grad():
        expected = wrapper.theta(x).mean(dim=1)
    assert a.maps.dtype == torch.float32 and a.maps.shape == (5, 16, 16)
    assert torch.allclose(a.maps, expected, atol=1e-6)
    assert float(a.maps.min()) >= 0 and float(a.maps.max()) <= 1
    assert a.method == "medtex_theta" and a.layer is None


def test_theta_explainer_refuses_models_without_theta(medtex, tiny_model):
    with pytest.raises(ThetaUnavailableError, match="'medtex' or 'medex'"):
        build_explainer("medtex_theta", tiny_model("teacher"))
    with pytest.raises(ConfigError, match="batch_size"):
        build_explainer("medtex_theta", medtex().student, {"batch_size": 0})
