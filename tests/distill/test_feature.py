"""Feature distillers (FitNets, AT, NST, AB, VID) and their adapters: hand-computed losses, training
steps with a frozen teacher, hooks, layer names, spatial mismatches and parameter ranges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xkd.config import ConfigError
from xkd.data.base import Batch, TensorImageDataset
from xkd.distill.adapters import conv_adapter, match_size, probe_shapes, resolve_layer_pairs
from xkd.distill.base import DistillContext, build_distiller
from xkd.distill.feature import (
    ab_loss,
    at_loss,
    attention_map,
    hint_loss,
    nst_loss,
)
from xkd.distill.logits import kd_loss
from xkd.distill.vid import VIDLoss
from xkd.models.hooks import LayerNotFoundError

METHODS = ["fitnets", "at", "nst", "ab", "vid"]
TERMS = {"fitnets": "hint", "at": "at", "nst": "nst", "ab": "ab", "vid": "vid"}
WITH_ADAPTERS = ["fitnets", "ab", "vid"]


pytestmark = pytest.mark.usefixtures("one_thread")


def context():
    return DistillContext(sample=torch.zeros(2, 1, 16, 16))


def fixed_batch():
    g = torch.Generator().manual_seed(2)
    return Batch(torch.rand(8, 1, 16, 16, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))


def t4(values):
    """A (1, C, 1, W) feature map from a list of channels."""
    return torch.tensor(values, dtype=torch.float32)[None, :, None, :]


# ---------------------------------------------------------------------------------------------- losses by hand


def test_attention_map_and_at_loss_match_hand_computation():
    s = t4([[1.0, 0.0], [1.0, 2.0]])  # mean_c F^2 = (1, 2) -> (1, 2) / sqrt(5)
    t = t4([[3.0, 0.0]])  # (9, 0) -> (1, 0)
    assert attention_map(s)[0].tolist() == pytest.approx([1 / math.sqrt(5), 2 / math.sqrt(5)])
    # ((1/sqrt5 - 1)^2 + (2/sqrt5)^2) / 2 = (2 - 2/sqrt5) / 2 = 1 - 1/sqrt5
    assert float(at_loss(s, t)) == pytest.approx(1 - 1 / math.sqrt(5), rel=1e-6)
    assert float(at_loss(t, t)) == pytest.approx(0.0, abs=1e-7)


def test_nst_loss_matches_hand_computation():
    s = t4([[1.0, 0.0], [1.0, 1.0]])  # normalised channels (1, 0), (1/sqrt2, 1/sqrt2)
    t = t4([[0.0, 2.0]])  # (0, 1)
    # k = (x.y)^2: mean k(t,t) = 1; k(s,s) = [[1, .5], [.5, 1]] -> 0.75; k(s,t) = (0, .5) -> 0.25
    assert float(nst_loss(s, t)) == pytest.approx(1 + 0.75 - 2 * 0.25, rel=1e-6)
    assert float(nst_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    # c = 1, d = 1 (linear kernel: c cancels, MMD^2 = ||mean_j s_j - mean_i t_i||^2):
    # k(t,t) = 2; k(s,s) mean = (2 + 2 + 2 (1 + 1/sqrt2)) / 4; k(s,t) mean = (1 + 1 + 1/sqrt2) / 2
    r = 1 / math.sqrt(2)
    expected = 2 + (4 + 2 * (1 + r)) / 4 - 2 * (2 + r) / 2
    assert expected == pytest.approx((0.5 + r / 2) ** 2 + (r / 2 - 1) ** 2)
    assert float(nst_loss(s, t, c=1.0, d=1)) == pytest.approx(expected, rel=1e-6)


def test_vid_loss_matches_hand_computation_and_reductions():
    vid = VIDLoss(1, 1, mid_channels=1, init_pred_var=2.0, eps=1e-5)
    assert vid.variance().tolist() == pytest.approx([2.0], rel=1e-6)
    with torch.no_grad():
        vid.regressor[0].weight.fill_(1.0)
        vid.regressor[0].bias.fill_(0.0)
        vid.regressor[2].weight.fill_(1.0)
        vid.regressor[2].bias.fill_(0.5)
    s = t4([[1.0, -1.0]])  # mu = relu(s) + 0.5 = (1.5, 0.5)
    t = t4([[2.0, 0.5]])
    # per element: log sigma + (t - mu)^2 / (2 sigma^2) with sigma^2 = 2
    expected_sum = 2 * 0.5 * math.log(2.0) + 0.25 / 4
    assert vid(s, t).item() == pytest.approx(expected_sum, rel=1e-5)
    two = vid(torch.cat([s, s]), torch.cat([t, t])).item()  # mean over the batch
    assert two == pytest.approx(expected_sum, rel=1e-5)
    vid.reduction = "mean"
    assert vid(s, t).item() == pytest.approx(expected_sum / 2, rel=1e-5)


def test_vid_loss_gradients_reach_regressor_and_variance_and_it_resamples():
    vid = VIDLoss(3, 5)
    s, t = torch.randn(2, 3, 2, 2, requires_grad=True), torch.randn(2, 5, 4, 4)
    vid(s, t).backward()
    assert vid.log_scale.grad is not None and s.grad is not None
    assert all(p.grad is not None for p in vid.regressor.parameters())
    with pytest.raises(ValueError, match="reduction"):
        VIDLoss(1, 1, reduction="max")


def test_ab_loss_matches_hand_computation():
    r = t4([[0.5, -2.0, 3.0]])
    t = t4([[1.0, 1.0, -1.0]])  # rho = (1, 1, 0)
    # relu(1 - 0.5)^2 + relu(1 + 2)^2 + relu(1 + 3)^2 = 0.25 + 9 + 16
    assert float(ab_loss(r, t, margin=1.0)) == pytest.approx(25.25, rel=1e-6)
    # responses beyond the margin on the teacher's side cost nothing (the hinge of eq. 6)
    assert float(ab_loss(t4([[2.0, -2.0]]), t4([[1.0, 0.0]]), margin=1.0)) == 0.0


def test_hint_loss_is_mean_squared_error():
    r, t = t4([[1.0, 2.0], [0.0, 0.0]]), t4([[0.0, 0.0], [1.0, 1.0]])
    assert float(hint_loss(r, t)) == pytest.approx((1 + 4 + 1 + 1) / 4)


# ---------------------------------------------------------------------------------------------- distillers


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_teacher_frozen_and_loss_decreases(name, tiny_pair):
    student, teacher = tiny_pair
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = build_distiller(name, student, teacher, None, context())
    d.train()
    assert not teacher.training and student.training
    mods = d.trainable_modules()
    assert set(mods) == {"student", "adapters"}
    assert (len(list(mods["adapters"].parameters())) > 0) == (name in WITH_ADAPTERS)
    opt = torch.optim.Adam(mods.parameters(), lr=3e-3)
    batch = fixed_batch()
    losses = []
    for _ in range(6):
        logits, terms = d(batch)
        assert set(terms) == {"ce", TERMS[name]} and logits.shape == (8, 3)
        loss = sum(terms.values())
        assert torch.isfinite(loss)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses
    assert not teacher.training
    for k, v in teacher.state_dict().items():  # weights and BN statistics untouched
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for m in (student, teacher):  # hooks removed after every forward
        assert all(not sub._forward_hooks for sub in m.modules())


def test_default_layers_are_each_models_default_layer(tiny_pair):
    d = build_distiller("at", *tiny_pair)
    assert d.pairs == [("blocks.2.1", "layer3")]


def test_hooked_features_are_the_real_layer_outputs(tiny_pair):
    student, teacher = tiny_pair
    d = build_distiller("at", student, teacher, {"layers": [["blocks.1.0", "layer2"]]})
    seen = {}

    def record(i, fs, ft):
        seen["s"], seen["t"] = fs, ft
        return at_loss(fs, ft)

    d.pair_loss = record
    batch = fixed_batch()
    d(batch)
    expected_s = student.blocks[1][0](student.blocks[0](batch.images))
    assert torch.allclose(seen["s"], expected_s)
    assert seen["s"].requires_grad and not seen["t"].requires_grad
    outs = {}
    h = teacher.layer2.register_forward_hook(lambda m, i, o: outs.setdefault("t", o))
    with torch.no_grad():
        teacher(batch.images)
    h.remove()
    assert torch.equal(seen["t"], outs["t"])


def test_probe_shapes_restores_modes_and_leaves_bn_statistics(tiny_pair):
    teacher = tiny_pair[1].train()
    stats = teacher.bn1.running_mean.clone()
    shapes = probe_shapes(teacher, ["layer1", "layer3"], torch.rand(2, 1, 16, 16))
    assert shapes == {"layer1": torch.Size([2, 4, 16, 16]), "layer3": torch.Size([2, 16, 4, 4])}
    assert teacher.training and all(m.training for m in teacher.modules())
    assert torch.equal(teacher.bn1.running_mean, stats)
    assert all(not m._forward_hooks for m in teacher.modules())


def test_at_term_is_half_beta_times_sum_over_pairs_and_optional_kd(tiny_pair):
    student, teacher = tiny_pair
    layers = [["blocks.1.1", "layer2"], ["blocks.2.1", "layer3"]]
    d = build_distiller("at", student, teacher, {"layers": layers, "beta": 10.0, "kd_weight": 0.5, "temperature": 2})
    batch = fixed_batch()
    logits, terms = d(batch)
    with torch.no_grad():
        t_logits = teacher(batch.images)
    feats = {}
    hs = [
        student.blocks[1][1].register_forward_hook(lambda m, i, o: feats.setdefault("s1", o)),
        student.blocks[2][1].register_forward_hook(lambda m, i, o: feats.setdefault("s2", o)),
        teacher.layer2.register_forward_hook(lambda m, i, o: feats.setdefault("t1", o)),
        teacher.layer3.register_forward_hook(lambda m, i, o: feats.setdefault("t2", o)),
    ]
    with torch.no_grad():
        student(batch.images), teacher(batch.images)
    for h in hs:
        h.remove()
    expected = 10.0 * (at_loss(feats["s1"], feats["t1"]) + at_loss(feats["s2"], feats["t2"]))
    assert set(terms) == {"ce", "at", "kd"}
    assert terms["at"].item() == pytest.approx(float(expected), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.5 * kd_loss(logits, t_logits, 2.0).item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, batch.labels).item(), rel=1e-6)


def test_adapters_are_sized_from_probed_shapes_and_trained(tiny_pair):
    student, teacher = tiny_pair
    d = build_distiller("fitnets", student, teacher, None, context())
    conv = d.adapters[0][0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 16, (1, 1))
    w0 = conv.weight.detach().clone()
    opt = torch.optim.SGD(d.trainable_modules().parameters(), lr=0.01)
    _, terms = d(fixed_batch())
    sum(terms.values()).backward()
    opt.step()
    assert not torch.equal(conv.weight, w0)
    vid = build_distiller("vid", student, teacher, {"mid_channels": 5}, context())
    assert vid.adapters[0].regressor[0].out_channels == 5 and vid.adapters[0].log_scale.shape == (16,)


@pytest.mark.parametrize("name", WITH_ADAPTERS)
def test_forward_without_setup_is_a_clear_error(name, tiny_pair):
    d = build_distiller(name, *tiny_pair)
    with pytest.raises(RuntimeError, match=r"setup\(context\) was not run"):
        d(fixed_batch())


@pytest.mark.parametrize("name", ["at", "nst"])
def test_methods_without_adapters_need_no_setup(name, tiny_pair):
    d = build_distiller(name, *tiny_pair)
    _, terms = d(fixed_batch())
    assert torch.isfinite(terms[name])


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("layers,model", [([["blocks.9", "layer3"]], "KDFMVStudent"), ([["blocks.2.1", "nope"]], "")])
def test_unknown_layer_lists_module_paths(layers, model, tiny_pair):
    with pytest.raises(LayerNotFoundError, match="module paths") as e:
        build_distiller("fitnets", *tiny_pair, {"layers": layers})
    text = str(e.value)
    assert ("blocks.0.0" in text) if model else ("layer3.0.conv1" in text)


@pytest.mark.parametrize("name", METHODS)
def test_different_spatial_sizes_resample_the_student_map(name, tiny_model):
    """Student layer 8x8 vs teacher 4x4, and student 4x4 vs teacher 8x8: the student map is
    resampled (bilinear) to the teacher's size; training runs."""
    for layers in ([["blocks.1.1", "layer3"]], [["blocks.2.1", "layer2"]]):
        d = build_distiller(name, tiny_model("student", 0), tiny_model("teacher", 1), {"layers": layers}, context())
        _, terms = d(fixed_batch())
        loss = sum(terms.values())
        loss.backward()
        assert torch.isfinite(loss)


def test_match_size():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert match_size(x, (4, 4)) is x
    y = match_size(x, torch.Size([3, 7, 2, 2]))
    assert torch.allclose(y, F.interpolate(x, size=(2, 2), mode="bilinear", align_corners=False))
    assert y.shape == (1, 1, 2, 2) and float(y[0, 0, 0, 0]) == pytest.approx((0 + 1 + 4 + 5) / 4)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        match_size(torch.zeros(2, 10), (3, 3))


def test_non_map_layers_are_a_clear_error(tiny_model, tiny_pair):
    # AT and NST need spatial maps; the message names the methods that take flat features
    for name in ("at", "nst"):
        with pytest.raises(ValueError, match=r"needs \(N, C, H, W\) feature maps.*fitnets, ab, vid"):
            build_distiller(
                name,
                tiny_model("student", 0),
                tiny_model("teacher", 1),
                {"layers": [["classifier", "layer3"]]},
                context(),
            )
    # a flat student feature against a teacher map: pair like with like
    with pytest.raises(ValueError, match=r"'classifier' outputs \(2, 3\) but teacher layer 'layer3'.*linear layer"):
        build_distiller("fitnets", *tiny_pair, {"layers": [["classifier", "layer3"]]}, context())
    # preflight (run by the pipeline before any training) raises the same, without building adapters
    d = build_distiller("at", *tiny_pair, {"layers": [["classifier", "layer3"]]})
    with pytest.raises(ValueError, match=r"needs \(N, C, H, W\)"):
        d.preflight(torch.zeros(2, 1, 16, 16))


# ---------------------------------------------------------------------------------------------- linear layers


def flat_models():
    """Student ``x -> fc(x) = x`` (2 -> 2, identity) and teacher ``x -> (x1, x2, x1 + x2)`` (2 -> 3), on
    (N, 1, 1, 2) images, each followed by ReLU and a 3-class head; layer ``"1"`` is the linear layer."""
    student = nn.Sequential(nn.Flatten(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3))
    with torch.no_grad():
        student[1].weight.copy_(torch.eye(2))
        student[1].bias.zero_()
        teacher[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        teacher[1].bias.zero_()
    return student, teacher


def test_fitnets_hint_on_linear_layers_matches_hand_computation():
    student, teacher = flat_models()
    d = build_distiller(
        "fitnets", student, teacher, {"layers": [["1", "1"]]}, DistillContext(sample=torch.zeros(2, 1, 1, 2))
    )
    (adapter,) = d.adapters[0]  # a plain linear regressor 2 -> 3 (no BN for flat features)
    assert isinstance(adapter, nn.Linear) and (adapter.in_features, adapter.out_features) == (2, 3)
    with torch.no_grad():
        adapter.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))  # r(s) = (s1, s2, 0)
        adapter.bias.zero_()
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]]).view(2, 1, 1, 2)
    _, terms = d(Batch(x, torch.tensor([0, 1])))
    # r(s) - t = (0, 0, -(x1 + x2)) per sample: squares 0, 0, 9 and 0, 0, 1 -> mean 10 / 6; beta 100
    assert terms["hint"].item() == pytest.approx(100 * 10 / 6, rel=1e-6)
    assert hint_loss(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[1.0, 2.0, 3.0]])).item() == pytest.approx(3.0)


def test_fitnets_regressor_ends_with_a_relu_where_the_hint_is_non_negative():
    """``regressor_relu: auto`` looks at the teacher's features on training images: layer "1" (linear,
    before its ReLU) takes negative values, layer "2" (the ReLU) does not."""
    student, teacher = flat_models()
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]]).view(2, 1, 1, 2)
    train = TensorImageDataset(x, torch.tensor([0, 1]))
    ctx = DistillContext(sample=torch.zeros(2, 1, 1, 2), train=train)
    d = build_distiller("fitnets", student, teacher, {"layers": [["1", "1"], ["2", "2"]]}, ctx)
    assert d.relu_pairs == [False, True]
    assert [type(m).__name__ for m in d.adapters[1]] == ["Linear", "ReLU"] and len(d.adapters[0]) == 1
    with torch.no_grad():
        for a in d.adapters:
            a[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # r(s) = (s1, s2, -s1)
            a[0].bias.zero_()
    hint = {}
    d.pair_loss = lambda i, fs, ft: hint.setdefault(i, hint_loss(d.adapters[i](fs), ft))
    d(Batch(x, torch.tensor([0, 1])))
    # pair 2: s = relu(x) = (1, 2), (0, 0); r(s) = relu(1, 2, -1), relu(0, 0, 0); t = relu(x1, x2, x1 + x2)
    # = (1, 2, 3), (0, 0, 0): squares 0, 0, 9 and 0, 0, 0 -> 9 / 6 (without the ReLU (-1 - 3)^2: 16 / 6)
    assert hint[1].item() == pytest.approx(9 / 6, rel=1e-6)
    # pair 1 (no ReLU): r(s) = (1, 2, -1), (0, -1, 0); t = (1, 2, 3), (0, -1, -1): 16 and 1 -> 17 / 6
    assert hint[0].item() == pytest.approx(17 / 6, rel=1e-6)
    # set by hand: the same for every pair
    for value in (True, False):
        d = build_distiller(
            "fitnets", student, teacher, {"layers": [["1", "1"], ["2", "2"]], "regressor_relu": value}, ctx
        )
        assert d.relu_pairs == [value, value]
    # without training images to look at (the sample is zeros, which tell nothing of the sign): none
    d = build_distiller("fitnets", student, teacher, {"layers": [["2", "2"]]}, DistillContext(torch.zeros(2, 1, 1, 2)))
    assert d.relu_pairs == [False]


def test_linear_adapter_params_train_with_the_student():
    student, teacher = flat_models()
    d = build_distiller("fitnets", student, teacher, {"layers": [["1", "1"]]}, DistillContext(torch.zeros(2, 1, 1, 2)))
    adapter = d.adapters[0][0]
    trained = {id(p) for p in d.trainable_modules().parameters()}  # what the Trainer optimises and checkpoints
    assert id(adapter.weight) in trained and id(student[1].weight) in trained
    assert any(k.startswith("adapters.0.0.") for k in d.trainable_modules().state_dict())
    assert all(id(p) not in trained for p in teacher.parameters())
    w_adapter, w_student = adapter.weight.detach().clone(), student[1].weight.detach().clone()
    opt = torch.optim.SGD(d.trainable_modules().parameters(), lr=0.01)
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0], [0.5, 0.5]]).view(3, 1, 1, 2)
    _, terms = d(Batch(x, torch.tensor([0, 1, 2])))
    terms["hint"].backward()
    opt.step()
    assert not torch.equal(adapter.weight, w_adapter) and not torch.equal(student[1].weight, w_student)
    assert teacher[1].weight.grad is None


def test_ab_and_vid_take_linear_layers_at_and_nst_do_not():
    sample = DistillContext(torch.zeros(2, 1, 1, 2))
    student, teacher = flat_models()
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]]).view(2, 1, 1, 2)
    ab = build_distiller("ab", student, teacher, {"layers": [["1", "1"]]}, sample)
    assert isinstance(ab.adapters[0][0], nn.Linear)
    with torch.no_grad():  # connector r(s) = (s1, s2, 0); t = (1, 2, 3), (0, -1, -1); margin 1
        ab.adapters[0][0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        ab.adapters[0][0].bias.zero_()
    # sample 1, t > 0 everywhere: relu(1 - r)^2 = 0, 0, 1; sample 2: t = (0, -1, -1) <= 0:
    # relu(1 + r)^2 = 1, 0, 1 -> per-sample sums 1 and 2, mean 1.5, times beta 1e-3
    assert ab(Batch(x, torch.tensor([0, 1])))[1]["ab"].item() == pytest.approx(1.5e-3, rel=1e-6)
    vid = build_distiller("vid", student, teacher, {"layers": [["1", "1"]], "mid_channels": 4}, sample)
    assert isinstance(vid.adapters[0].regressor[0], nn.Linear) and vid.adapters[0].log_scale.shape == (3,)
    loss = vid(Batch(x, torch.tensor([0, 1])))[1]["vid"]
    loss.backward()
    assert torch.isfinite(loss) and vid.adapters[0].log_scale.grad is not None
    for name in ("at", "nst"):
        with pytest.raises(ValueError, match=rf"{name}: student layer '1' outputs shape \(2, 2\); {name} needs"):
            build_distiller(name, *flat_models(), {"layers": [["1", "1"]]}, sample)


def test_conv_adapter_and_resolve_defaults(tiny_pair):
    a = conv_adapter(3, 5, bn=False)
    assert len(a) == 1 and a[0].bias is not None and a(torch.zeros(1, 3, 2, 2)).shape == (1, 5, 2, 2)
    assert isinstance(conv_adapter(3, 5)[1], nn.BatchNorm2d)
    assert resolve_layer_pairs(None, *tiny_pair) == [("blocks.2.1", "layer3")]


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("fitnets", {"temperature": 0}, "temperature must be > 0"),
        ("at", {"temperature": -1.0}, "temperature must be > 0"),
        ("nst", {"alpha_ce": 1.5}, r"alpha_ce must be in \[0, 1\]"),
        ("ab", {"alpha_ce": -0.1}, r"alpha_ce must be in \[0, 1\]"),
        ("vid", {"beta": -1}, "beta must be"),
        ("at", {"kd_weight": -1}, "kd_weight"),
        ("at", {"p": 0}, "p must be > 0"),
        ("nst", {"kernel_degree": 0}, "kernel_degree"),
        ("ab", {"margin": -1}, "margin"),
        ("vid", {"eps": 0}, "eps must be > 0"),
        ("vid", {"reduction": "max"}, "allowed values"),
        ("fitnets", {"layers": [["a"]]}, r"layers\[0\] must be a pair"),
        ("fitnets", {"layers": []}, "non-empty list"),
        ("at", {"margin": 1.0}, "unknown key 'params.margin'"),
    ],
)
def test_bad_parameters_are_rejected(name, params, match, tiny_pair):
    with pytest.raises(ConfigError, match=match):
        build_distiller(name, *tiny_pair, params)


# -- what the docstrings say about RepDistiller's AB and VID (issue 13, finding 11) -------------------


def _repdistiller_ab(g_s: list[torch.Tensor], g_t: list[torch.Tensor], margin: float = 1.0) -> torch.Tensor:
    """RepDistiller's ``distiller_zoo/AB.py`` ``ABLoss.forward`` (written out here), its per-layer losses summed."""
    n, bsz = len(g_s), g_s[0].shape[0]
    total = torch.zeros(())
    for i, (source, target) in enumerate(zip(g_s, g_t)):
        loss = (source + margin) ** 2 * ((source > -margin) & (target <= 0)).float() + (source - margin) ** 2 * (
            (source <= margin) & (target > 0)
        ).float()
        total = total + 2 ** (i - n + 1) * torch.abs(loss).sum() / bsz / 1000 * 3
    return total


def test_ab_scale_is_a_third_of_repdistillers_at_the_default_beta():
    from xkd.distill.feature import ABParams, ActivationBoundaries

    g = torch.Generator().manual_seed(0)
    r, t = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    reference = float(_repdistiller_ab([r], [t]))
    xkd_sum = float(ab_loss(r, t, margin=1.0))
    assert reference == pytest.approx(3e-3 * xkd_sum, rel=1e-6)  # beta = 3e-3 matches RepDistiller
    assert ABParams().beta == 1e-3  # the default is kept: a third of RepDistiller's scale
    assert reference == pytest.approx(3 * ABParams().beta * xkd_sum, rel=1e-6)
    for doc in (ABParams.__doc__, ab_loss.__doc__, ActivationBoundaries.__doc__):
        assert "3e-3" in doc, doc
    assert "reproduces RepDistiller's ``ABLoss`` scale" not in ABParams.__doc__


def test_vid_regressor_differs_from_repdistillers_as_documented():
    from xkd.distill.feature import VID

    # RepDistiller's VIDLoss regressor: conv1x1 -> ReLU -> conv1x1 -> ReLU -> conv1x1, bias=False
    reference = nn.Sequential(
        nn.Conv2d(3, 5, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(5, 5, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(5, 5, 1, bias=False),
    )
    convs = [m for m in VIDLoss(3, 5).regressor if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(c.bias is not None for c in convs)
    assert len([m for m in reference if isinstance(m, nn.Conv2d)]) == 3
    assert sum(p.numel() for p in VIDLoss(3, 5).regressor.parameters()) == 3 * 5 + 5 + 5 * 5 + 5
    assert sum(p.numel() for p in reference.parameters()) == 3 * 5 + 5 * 5 + 5 * 5
    doc = VIDLoss.__doc__
    assert "**three** 1x1 convs **without bias**" in doc and "**two with bias**" in doc
    assert "three bias-free" in VID.__doc__
