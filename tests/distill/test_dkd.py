"""Decoupled KD: TCKD and NCKD against hand-computed values, the warm-up ramp, training."""

from __future__ import annotations

import math

import pytest
import torch

from xkd.config import ConfigError
from xkd.data.base import Batch
from xkd.distill.base import build_distiller
from xkd.distill.logits import DKD, dkd_terms, kd_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def logs(ps):
    return [math.log(p) for p in ps]


# Logits that are log-probabilities, so softmax at T = 1 gives back these numbers.
P_S, P_T = [0.5, 0.25, 0.25], [0.6, 0.3, 0.1]


def test_tckd_and_nckd_match_hand_computation_on_three_classes():
    # target class 0, T = 1.
    # binary: b_t = (0.6, 0.4), b_s = (0.5, 0.5)
    #   TCKD = 0.6 ln(0.6/0.5) + 0.4 ln(0.4/0.5) = 0.6 * 0.1823216 - 0.4 * 0.2231436 = 0.0201355
    # non-target: p^_t = (0.3, 0.1) / 0.4 = (0.75, 0.25), p^_s = (0.25, 0.25) / 0.5 = (0.5, 0.5)
    #   NCKD = 0.75 ln(1.5) + 0.25 ln(0.5) = 0.75 * 0.4054651 - 0.25 * 0.6931472 = 0.1308120
    tckd, nckd = dkd_terms(torch.tensor([logs(P_S)]), torch.tensor([logs(P_T)]), torch.tensor([0]), 1.0)
    assert float(tckd) == pytest.approx(0.6 * math.log(1.2) + 0.4 * math.log(0.8), rel=1e-5)
    assert float(tckd) == pytest.approx(0.0201355, abs=1e-6)
    assert float(nckd) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)
    assert float(nckd) == pytest.approx(0.1308120, abs=1e-6)
    # Zhao et al. eq. 3: KD = TCKD + (1 - p_t,target) NCKD = 0.0201355 + 0.4 * 0.1308120 = 0.0724603
    kd = float(kd_loss(torch.tensor([logs(P_S)]), torch.tensor([logs(P_T)]), 1.0))
    assert kd == pytest.approx(0.0724603, abs=1e-6)
    assert kd == pytest.approx(float(tckd) + 0.4 * float(nckd), rel=1e-5)


def test_dkd_terms_with_temperature_and_another_target():
    # target class 2, T = 2: z / T = log(p) / 2 -> softmax proportional to sqrt(p)
    t = 2.0
    qs = [math.sqrt(p) for p in P_S]
    qt = [math.sqrt(p) for p in P_T]
    qs, qt = [v / sum(qs) for v in qs], [v / sum(qt) for v in qt]
    bs, bt = [qs[2], 1 - qs[2]], [qt[2], 1 - qt[2]]
    tckd = t * t * sum(a * math.log(a / b) for a, b in zip(bt, bs))
    ns, nt = [qs[0], qs[1]], [qt[0], qt[1]]
    ns, nt = [v / sum(ns) for v in ns], [v / sum(nt) for v in nt]
    nckd = t * t * sum(a * math.log(a / b) for a, b in zip(nt, ns))
    got = dkd_terms(torch.tensor([logs(P_S)]), torch.tensor([logs(P_T)]), torch.tensor([2]), t)
    assert float(got[0]) == pytest.approx(tckd, rel=1e-5)
    assert float(got[1]) == pytest.approx(nckd, rel=1e-5)
    # the identity holds at any temperature: T^2 KL = TCKD + (1 - q_t,target) NCKD
    kd = float(kd_loss(torch.tensor([logs(P_S)]), torch.tensor([logs(P_T)]), t))
    assert kd == pytest.approx(float(got[0]) + (1 - qt[2]) * float(got[1]), rel=1e-5)


def test_dkd_terms_average_over_the_batch_and_vanish_for_identical_logits():
    zs, zt = torch.tensor([logs(P_S), logs(P_T)]), torch.tensor([logs(P_T), logs(P_S)])
    y = torch.tensor([0, 1])
    both = dkd_terms(zs, zt, y, 4.0)
    one = [dkd_terms(zs[i : i + 1], zt[i : i + 1], y[i : i + 1], 4.0) for i in range(2)]
    for k in range(2):
        assert float(both[k]) == pytest.approx((float(one[0][k]) + float(one[1][k])) / 2, rel=1e-6)
    zero = dkd_terms(zs, zs, y, 4.0)
    assert float(zero[0]) == pytest.approx(0.0, abs=1e-7) and float(zero[1]) == pytest.approx(0.0, abs=1e-7)


def test_dkd_terms_survive_extreme_logits():
    zs = torch.tensor([[80.0, -80.0, 0.0]], requires_grad=True)
    zt = torch.tensor([[-80.0, 80.0, 0.0]])
    tckd, nckd = dkd_terms(zs, zt, torch.tensor([0]), 1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(zs.grad).all()


def test_dkd_distiller_weights_its_terms(fixed_logits):
    d = build_distiller(
        "dkd", fixed_logits([logs(P_S)]), fixed_logits([logs(P_T)]), {"alpha": 2.0, "beta": 3.0, "temperature": 1.0}
    )
    _, terms = d(Batch(torch.zeros(1, 1, 4, 4), torch.tensor([0])))
    assert set(terms) == {"ce", "tckd", "nckd"}
    assert float(terms["ce"].detach()) == pytest.approx(-math.log(0.5), rel=1e-6)
    assert float(terms["tckd"].detach()) == pytest.approx(2.0 * 0.0201355, abs=1e-5)
    assert float(terms["nckd"].detach()) == pytest.approx(3.0 * 0.1308120, abs=1e-5)
    assert set(d.trainable_modules()) == {"student"}  # no warm-up: nothing else is trained or saved


def test_warmup_ramps_per_training_step_and_is_checkpointed(fixed_logits):
    d = build_distiller(
        "dkd", fixed_logits([logs(P_S)]), fixed_logits([logs(P_T)]), {"warmup_steps": 4, "temperature": 1.0}
    )
    batch = Batch(torch.zeros(1, 1, 4, 4), torch.tensor([0]))
    full = dkd_terms(torch.tensor([logs(P_S)]), torch.tensor([logs(P_T)]), torch.tensor([0]), 1.0)[1] * 8.0
    d.train()
    seen = [float(d(batch)[1]["nckd"].detach()) / float(full) for _ in range(6)]
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rel=1e-5)
    d.eval()  # evaluation and no-grad passes do not advance the ramp
    with torch.no_grad():
        d(batch)
    assert d.counter.count == 6  # counted on the host: reading it never waits for a GPU
    modules = d.trainable_modules()
    assert set(modules) == {"student", "dkd_state"}
    state = modules.state_dict()
    assert int(state["dkd_state.step"]) == 6  # the checkpoint carries the count
    fresh = build_distiller("dkd", fixed_logits([logs(P_S)]), fixed_logits([logs(P_T)]), {"warmup_steps": 4})
    fresh.trainable_modules().load_state_dict(state)
    assert fresh.counter.count == 6 and fresh.ramp() == 1.0


def test_dkd_trains_a_tiny_student_and_keeps_the_teacher_frozen(tiny_pair, train_steps):
    student, teacher = tiny_pair
    teacher.train()
    d = build_distiller("dkd", student, teacher)
    assert isinstance(d, DKD)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = Batch(torch.rand(8, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    losses = train_steps(d, batch, 6, lr=1e-2)
    assert losses[-1] < losses[0]
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "params,match",
    [
        ({"temperature": 0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"alpha": -0.5}, "alpha must be >= 0"),
        ({"beta": -1.0}, "beta must be >= 0"),
        ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"gamma": 1.0}, "unknown key 'params.gamma'"),
    ],
)
def test_bad_dkd_parameters_are_rejected(params, match, fixed_logits):
    with pytest.raises(ConfigError, match=match):
        build_distiller("dkd", fixed_logits([[0.0, 1.0]]), fixed_logits([[0.0, 1.0]]), params)


def test_a_dkd_step_with_warm_up_never_waits_for_the_host(device, fixed_logits, no_host_sync):
    d = build_distiller(
        "dkd", fixed_logits([logs(P_S)]), fixed_logits([logs(P_T)]), {"warmup_steps": 4, "temperature": 2.0}
    ).to(device)
    batch = Batch(torch.zeros(1, 1, 4, 4), torch.tensor([0])).to(device)
    d.train()
    d(batch)  # warm-up
    with no_host_sync(device):
        _, terms = d(batch)  # the ramp reads the step count on the host
    assert d.counter.count == 2 and float(terms["nckd"]) > 0
