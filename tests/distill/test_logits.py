"""Hinton KD and label smoothing against hand-computed values; the teacher stays frozen."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xkd.config import ConfigError
from xkd.data.base import Batch
from xkd.distill import build_distiller, kd_loss


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def test_kd_loss_matches_hand_computation():
    zs, zt, t = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 2.0
    ps = softmax([v / t for v in zs])
    pt = softmax([v / t for v in zt])
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    expected = t * t * kl
    # by hand: p_s = softmax(0.5, 1, 1.5) = (0.18632, 0.30720, 0.50648), p_t is its reverse, and
    # log(p_t1 / p_s1) = 1, so KL = (0.50648 - 0.18632) * 1 and T^2 KL = 4 * 0.32016
    assert expected == pytest.approx(1.2806267, rel=1e-6)
    got = kd_loss(torch.tensor([zs]), torch.tensor([zt]), t)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_zero_for_identical_logits_and_averages_over_batch():
    z = torch.tensor([[0.3, -1.0, 2.0], [1.0, 1.0, 1.0]])
    assert float(kd_loss(z, z, 4.0)) == pytest.approx(0.0, abs=1e-7)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    one = float(kd_loss(a, b, 1.0))
    two = float(kd_loss(torch.cat([a, a]), torch.cat([b, b]), 1.0))
    assert two == pytest.approx(one)


def test_hinton_kd_terms_match_hand_computation(fixed_logits):
    zs, zt, alpha, t = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 0.7, 2.0
    student, teacher = fixed_logits([zs]), fixed_logits([zt])
    d = build_distiller("hinton_kd", student, teacher, {"alpha": alpha, "temperature": t})
    logits, terms = d(Batch(torch.zeros(1, 1, 4, 4), torch.tensor([0])))
    ce = -math.log(softmax(zs)[0])
    ps, pt = softmax([v / t for v in zs]), softmax([v / t for v in zt])
    kd = t * t * sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    assert set(terms) == {"ce", "kd"}
    assert float(terms["ce"].detach()) == pytest.approx(alpha * ce, rel=1e-6)
    assert float(terms["kd"].detach()) == pytest.approx((1 - alpha) * kd, rel=1e-6)
    assert torch.equal(logits, student.logits)


def test_label_smoothing_matches_hand_computation(fixed_logits):
    zs, eps = [1.0, 2.0, 3.0], 0.1
    d = build_distiller("label_smoothing", fixed_logits([zs]), None, {"epsilon": eps})
    _, terms = d(Batch(torch.zeros(1, 1, 4, 4), torch.tensor([1])))
    p = softmax(zs)
    target = [eps / 3 + (1 - eps) * (i == 1) for i in range(3)]
    expected = -sum(q * math.log(pi) for q, pi in zip(target, p))
    assert float(terms["ce_smooth"].detach()) == pytest.approx(expected, rel=1e-6)


def test_scratch_is_plain_cross_entropy(fixed_logits):
    zs = [0.5, -0.5]
    d = build_distiller("scratch", fixed_logits([zs]))
    _, terms = d(Batch(torch.zeros(1, 1, 2, 2), torch.tensor([1])))
    assert float(terms["ce"].detach()) == pytest.approx(-math.log(softmax(zs)[1]), rel=1e-6)


def test_teacher_frozen_and_in_eval_mode_while_training():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    teacher.train()
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    d = build_distiller("hinton_kd", student, teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d.train()
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    opt = torch.optim.SGD(d.trainable_modules().parameters(), lr=0.1)
    for _ in range(3):
        _, terms = d(Batch(torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])))
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
    assert not teacher.training
    for k, v in teacher.state_dict().items():  # weights and BN running statistics unchanged
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("hinton_kd", {"temperature": 0}, "temperature must be > 0"),
        ("hinton_kd", {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ("hinton_kd", {"beta": 1}, "unknown key 'params.beta'"),
        ("label_smoothing", {"epsilon": 1.0}, "epsilon"),
    ],
)
def test_bad_parameters_are_rejected(name, params, match, fixed_logits):
    with pytest.raises(ConfigError, match=match):
        build_distiller(name, fixed_logits([[0.0, 1.0]]), fixed_logits([[0.0, 1.0]]), params)


def test_class_count_mismatch_is_a_clear_error(fixed_logits):
    with pytest.raises(ConfigError, match="teacher predicts 3 classes but the student predicts 2"):
        build_distiller("hinton_kd", fixed_logits([[0.0, 1.0]]), fixed_logits([[0.0, 1.0, 2.0]]))


def test_unknown_distiller_lists_registered_names(fixed_logits):
    with pytest.raises(KeyError, match=r"unknown distiller 'fitnet'; registered distillers: .*fitnets, hinton_kd"):
        build_distiller("fitnet", fixed_logits([[0.0]]))
