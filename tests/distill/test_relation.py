"""SP, RKD and PKT: losses against hand or numpy computations, hooks, training, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from xkd.config import ConfigError
from xkd.data.base import Batch
from xkd.distill.base import build_distiller
from xkd.distill.relation import (
    PKT,
    RKD,
    SP,
    embed,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    sp_loss,
)
from xkd.models.hooks import LayerNotFoundError

pytestmark = pytest.mark.usefixtures("one_thread")


BATCH = Batch(
    torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2] * 2 + [0, 1])
)


# ----------------------------------------------------------------------------------------------
# losses


def test_sp_loss_matches_numpy():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 7, 4, 4, generator=g)
    a, b = fs.reshape(5, -1).double().numpy(), ft.reshape(5, -1).double().numpy()

    def gram(x):
        m = x @ x.T
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    expected = ((gram(b) - gram(a)) ** 2).sum() / 25
    assert float(sp_loss(fs, ft)) == pytest.approx(expected, rel=1e-5)
    assert float(sp_loss(ft, ft)) == pytest.approx(0.0, abs=1e-7)


def test_sp_loss_by_hand_on_two_samples():
    # F_s = [[1, 0], [1, 1]] -> F F^T = [[1, 1], [1, 2]] -> rows / norms: [1, 1]/sqrt2, [1, 2]/sqrt5
    # F_t = [[1, 0], [0, 1]] -> F F^T = I (already normalised)
    # ||G_t - G_s||^2 = (1 - 1/sqrt2)^2 + (1/sqrt2)^2 + (1/sqrt5)^2 + (1 - 2/sqrt5)^2; / b^2 = 4
    expected = ((1 - 2**-0.5) ** 2 + 0.5 + 0.2 + (1 - 2 / 5**0.5) ** 2) / 4
    assert expected == pytest.approx(0.1992330, abs=1e-6)
    got = sp_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert float(got) == pytest.approx(expected, rel=1e-6)


# Three points: the teacher's form a right isosceles triangle, the student's a 2:1 right triangle.
T3 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
S3 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_distance_loss_by_hand_on_three_points():
    # teacher distances 1, 1, sqrt2, mean mu_t = (2 + sqrt2) / 3; student 2, 1, sqrt5, mu_s = (3 + sqrt5) / 3
    mu_t, mu_s = (2 + math.sqrt(2)) / 3, (3 + math.sqrt(5)) / 3
    diffs = [2 / mu_s - 1 / mu_t, 1 / mu_s - 1 / mu_t, math.sqrt(5) / mu_s - math.sqrt(2) / mu_t]
    # = (0.267218, -0.305731, 0.038512): all below 1, so Huber = x^2 / 2. Each pair appears twice in
    # the 3 x 3 matrix, the diagonal is 0 for both, and the mean runs over the 9 entries.
    expected = 2 * sum(huber(x) for x in diffs) / 9
    assert diffs == pytest.approx([0.267218, -0.305731, 0.038512], abs=1e-6)
    assert expected == pytest.approx(0.0184844, abs=1e-6)
    assert float(rkd_distance_loss(S3, T3)) == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_loss_by_hand_on_three_points():
    # cosines of the angles at each vertex: teacher (0, 1/sqrt2, 1/sqrt2); student: at (0,0) 0, at
    # (2,0) between (-2,0) and (-2,1): 4/(2 sqrt5) = 2/sqrt5, at (0,1) between (0,-1) and (2,-1): 1/sqrt5.
    # Of the 27 (i, j, k): j = k != i gives 1 for both, j or k = i gives 0 for both; the other 6 are
    # the angle at i, twice (j, k) and (k, j).
    diffs = [0.0, 2 / math.sqrt(5) - 1 / math.sqrt(2), 1 / math.sqrt(5) - 1 / math.sqrt(2)]
    expected = 2 * sum(huber(x) for x in diffs) / 27
    assert expected == pytest.approx(0.0038012, abs=1e-6)
    assert float(rkd_angle_loss(S3, T3)) == pytest.approx(expected, rel=1e-5)


def test_rkd_losses_ignore_scale_and_translation():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(6, 4, generator=g)
    assert float(rkd_distance_loss(3.0 * t + 1.0, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(rkd_angle_loss(0.5 * t - 2.0, t)) == pytest.approx(0.0, abs=1e-6)
    # the student's embedding may have another width than the teacher's
    assert float(rkd_distance_loss(torch.randn(6, 9, generator=g), t)) > 0


def test_pkt_loss_matches_numpy():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 11, generator=g)
    eps = 1e-7

    def cond(x):
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = (x @ x.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = cond(s.double().numpy()), cond(t.double().numpy())
    expected = np.mean(pt * np.log((pt + eps) / (ps + eps)))
    assert float(pkt_loss(s, t)) == pytest.approx(expected, rel=1e-4)
    assert float(pkt_loss(t, t)) == pytest.approx(0.0, abs=1e-7)


def test_embed_pools_maps_and_flattens_the_rest():
    x = torch.arange(24.0).reshape(2, 3, 2, 2)
    assert torch.equal(embed(x, pool=True), x.mean(dim=(2, 3)))
    assert torch.equal(embed(x, pool=False), x.reshape(2, 12))
    assert torch.equal(embed(x[:, :, 0, 0], pool=True), x[:, :, 0, 0])


# ----------------------------------------------------------------------------------------------
# distillers


def test_default_layers_hooks_and_terms(tiny_pair):
    student, teacher = tiny_pair
    d = build_distiller("rkd", student, teacher)
    assert isinstance(d, RKD) and d.pairs == [("blocks.2.1", "layer3")]
    d.eval()
    with torch.no_grad():
        logits, s_embs, t_embs = d.features(BATCH.images)
        # the modules' real outputs, computed without hooks
        s_map = student.blocks[2][1](student.blocks[2][0](student.blocks[1](student.blocks[0](BATCH.images))))
        x = teacher.relu(teacher.bn1(teacher.conv1(BATCH.images)))
        t_map = teacher.layer3(teacher.layer2(teacher.layer1(x)))
        # the pooled teacher embedding is exactly the classifier's input for cifar_resnet
        assert torch.allclose(teacher.fc(t_embs[0]), teacher(BATCH.images), atol=1e-6)
    assert torch.allclose(s_embs[0], s_map.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(t_embs[0], t_map.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(logits, student(BATCH.images))
    for model in (student, teacher):  # hooks removed after use
        assert all(not m._forward_hooks for m in model.modules())
    _, terms = d(BATCH)
    assert set(terms) == {"ce", "rkd_distance", "rkd_angle"}
    assert float(terms["rkd_distance"].detach()) == pytest.approx(
        25 * float(rkd_distance_loss(s_embs[0], t_embs[0])), rel=1e-5
    )
    assert float(terms["rkd_angle"].detach()) == pytest.approx(
        50 * float(rkd_angle_loss(s_embs[0], t_embs[0])), rel=1e-5
    )
    assert all(not m._forward_hooks for model in (student, teacher) for m in model.modules())


@pytest.mark.parametrize(
    "name,cls,term,fn,weight", [("sp", SP, "sp", sp_loss, 3000.0), ("pkt", PKT, "pkt", pkt_loss, 3e4)]
)
def test_sp_and_pkt_terms_use_the_hooked_features(name, cls, term, fn, weight, tiny_pair):
    student, teacher = tiny_pair
    d = build_distiller(name, student, teacher, {"ce_weight": 0.5})
    assert isinstance(d, cls)
    d.eval()
    logits, terms = d(BATCH)
    with torch.no_grad():
        _, s_embs, t_embs = d.features(BATCH.images)
    pooled = name == "pkt"
    assert s_embs[0].shape == ((8, 8) if pooled else (8, 8 * 4 * 4))  # SP keeps the whole map
    assert set(terms) == {"ce", term}
    assert float(terms[term].detach()) == pytest.approx(weight * float(fn(s_embs[0], t_embs[0])), rel=1e-5)
    ce = nn.functional.cross_entropy(logits, BATCH.labels)
    assert float(terms["ce"].detach()) == pytest.approx(0.5 * float(ce.detach()), rel=1e-6)


def test_several_layer_pairs_add_up(tiny_pair):
    student, teacher = tiny_pair
    pairs = [["blocks.1.1", "layer2"], ["blocks.2.1", "layer3"]]
    d = build_distiller("sp", student, teacher, {"layers": pairs})
    one = [build_distiller("sp", student, teacher, {"layers": [p]}) for p in pairs]
    for m in (d, *one):
        m.eval()
    total = float(d(BATCH)[1]["sp"].detach())
    assert total == pytest.approx(sum(float(m(BATCH)[1]["sp"].detach()) for m in one), rel=1e-5)


@pytest.mark.parametrize("name", ["sp", "rkd", "pkt"])
def test_training_lowers_the_loss_and_keeps_the_teacher_frozen(name, tiny_pair, train_steps):
    student, teacher = tiny_pair
    teacher.train()
    d = build_distiller(name, student, teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d.train()
    assert not teacher.training and student.training
    losses = train_steps(d, BATCH, 6, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["sp", "rkd", "pkt"])
def test_layers_of_different_spatial_size_need_no_adapter(name, tiny_pair):
    # student 16x16x4 map vs teacher 4x4x16 map: relations are b x b, so they are compared as is
    student, teacher = tiny_pair
    d = build_distiller(name, student, teacher, {"layers": [["blocks.0.1", "layer3"]]})
    assert set(d.trainable_modules()) == {"student"}
    _, terms = d(BATCH)
    loss = sum(terms.values())
    loss.backward()
    assert torch.isfinite(loss)
    assert student.blocks[0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_unknown_layer_lists_module_paths(role, tiny_pair):
    student, teacher = tiny_pair
    pair = ["blocks.9", "layer3"] if role == "student" else ["blocks.2.1", "layer9"]
    with pytest.raises(LayerNotFoundError, match="module paths") as e:
        build_distiller("pkt", student, teacher, {"layers": [pair]})
    assert ("blocks.0.0" if role == "student" else "layer1.0.conv1") in str(e.value)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("sp", {"weight": -1.0}, "weight must be >= 0"),
        ("sp", {"ce_weight": -0.1}, "ce_weight must be >= 0"),
        ("rkd", {"distance_weight": -25.0}, "distance_weight must be >= 0"),
        ("rkd", {"angle_weight": float("nan")}, "angle_weight must be >= 0"),
        ("pkt", {"weight": -3.0}, "weight must be >= 0"),
        ("pkt", {"layers": []}, "non-empty list"),
        ("sp", {"layers": [["blocks.2.1"]]}, r"layers\[0\] must be a pair"),
        ("rkd", {"temperature": 4.0}, "unknown key 'params.temperature'"),
    ],
)
def test_bad_parameters_are_rejected(name, params, match, tiny_pair):
    student, teacher = tiny_pair
    with pytest.raises(ConfigError, match=match):
        build_distiller(name, student, teacher, params)


def test_relation_methods_need_a_teacher(tiny_pair):
    student, _ = tiny_pair
    with pytest.raises(ConfigError, match="needs a teacher"):
        SP(student, None)


@pytest.mark.parametrize(
    "name,fns",
    [
        ("sp", {"sp": (sp_loss, 3000.0)}),
        ("pkt", {"pkt": (pkt_loss, 3e4)}),
        ("rkd", {"rkd_distance": (rkd_distance_loss, 25.0), "rkd_angle": (rkd_angle_loss, 50.0)}),
    ],
)
def test_relation_terms_are_fp32_under_autocast(name, fns, tiny_pair):
    """Under bf16 autocast (the GPU default) the features come in bf16, but the Gram matrices, distances
    and kernels are computed in fp32: in bf16 RKD's distances and PKT's near-1 kernels lose their digits
    (PKT's KL came out negative) and SP's Gram matrix overflows fp16."""
    student, teacher = tiny_pair
    d = build_distiller(name, student, teacher)
    d.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = d(BATCH)
        with torch.no_grad():
            _, s_embs, t_embs = d.features(BATCH.images)
    for term, (fn, weight) in fns.items():
        assert terms[term].dtype == torch.float32
        exact = weight * float(fn(s_embs[0].float(), t_embs[0].float()))  # fp32 maths on the bf16 features
        assert float(terms[term].detach()) == pytest.approx(exact, rel=1e-5), term
