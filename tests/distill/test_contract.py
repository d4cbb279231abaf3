"""The contract of every registered distiller, on the CPU and (``device`` fixture) a CUDA device when
there is one: while the student trains (two :class:`xkd.Trainer` steps on tiny models and data), the
teacher stays frozen (no ``requires_grad``, no gradient, weights and BatchNorm statistics unchanged)
and in eval mode, also inside each of its forward passes; the distiller ends on the device.

A distiller registered without an entry in :data:`CASES` fails here: give it the small parameters
that make it run on the tiny models in a few seconds.
"""

from __future__ import annotations

import pytest
import torch

import xkd
import xkd.api  # noqa: F401  (registers every distiller, model and explainer, as users see them)
from xkd.config import OptimizerConfig, TrainConfig
from xkd.distill.base import DistillContext
from xkd.registry import DISTILLERS

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> the small params it runs with; every distiller gets the same setup context (training data,
# a cache folder), so methods with a phase before training (adapters, XDistillation's CAE) set up too.
CASES: dict[str, dict] = {
    "scratch": {},
    "label_smoothing": {},
    "hinton_kd": {},
    "dist": {},
    "dkd": {"warmup_steps": 1},
    "fitnets": {},
    "at": {},
    "nst": {},
    "ab": {},
    "vid": {},
    "sp": {},
    "rkd": {},
    "pkt": {},
    "medtex": {"explainer_widths": [4, 8]},
    "medex": {"explainer_widths": [4, 8]},
    "medtex_student_only": {},
    "cat_kd": {},
    "crd": {"feat_dim": 16},  # nce_k: as many as the 16 images allow (10)
    "xdistill": {"explainer": "grad_cam", "max_images": 8, "cae_epochs": 1, "cae_batch_size": 8, "cae_grid": 4},
    # live Grad-CAMs; the frozen variant (no teacher pass while training) is checked in test_e2kd.py
    "e2kd": {"guided_step_interval": 2},
    # the inner method with adapters, so the chain's setup reaches it
    "teacher_assistant": {"assistant": {"name": "kdfmv_cnn", "params": {"widths": [4, 8]}}, "distiller": "fitnets"},
}


def test_every_registered_distiller_has_a_case():
    missing = sorted(set(DISTILLERS.names()) - set(CASES))
    assert not missing, f"distillers without an entry in CASES of {__file__}: {missing}; add their small params"
    assert not set(CASES) - set(DISTILLERS.names()), "CASES names distillers that are not registered"


@pytest.mark.parametrize("name", DISTILLERS.names())
def test_teacher_stays_frozen_and_in_eval_mode_while_the_student_trains(
    name, tmp_path, tiny_pair, tiny_data, device, caplog
):
    if name not in CASES:
        pytest.fail(f"distiller {name!r} is registered but has no entry in CASES of {__file__}")
    student, teacher = (m.to(device) for m in tiny_pair)
    teacher.train()  # as a caller may hand it over: the distiller must switch it to eval mode itself
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    # the sample and the datasets stay on the CPU, as the pipeline hands them over: dry runs and the
    # trainer move what they read to the models' device
    context = DistillContext(
        sample=torch.zeros(2, 1, 16, 16),
        train=tiny_data(16),
        cache_dir=tmp_path,
        teacher_key="contract",
        device=device,
    )
    d = xkd.build_distiller(name, student, teacher, CASES[name], context)
    seen: list[tuple[bool, bool]] = []  # per teacher forward pass: (any module training, any requires_grad)
    teacher.register_forward_pre_hook(
        lambda m, args: seen.append(
            (any(x.training for x in m.modules()), any(p.requires_grad for p in m.parameters()))
        )
    )
    # compared on the CPU: a module setup left elsewhere is moved by the trainer
    trainable = {k: v.detach().cpu().clone() for k, v in d.trainable_modules().named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=8, optimizer=OptimizerConfig("sgd", lr=0.05), max_steps_per_epoch=2)
    result = xkd.Trainer(d, tiny_data(16), tiny_data(6), cfg, device=device, progress=False).fit()

    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    assert "not in its trainable_modules()" not in caplog.text  # every trainable parameter is trained and kept
    changed = [
        k for k, v in d.trainable_modules().named_parameters() if not torch.equal(v.detach().cpu(), trainable[k])
    ]
    assert changed, f"{name}: two optimiser steps changed none of the trainable parameters"
    elsewhere = [k for k, t in [*d.named_parameters(), *d.named_buffers()] if t.device.type != device.type]
    assert not elsewhere, f"{name}: not on {device.type} after training: {elsewhere}"
    if not DISTILLERS.get(name).needs_teacher:
        assert d.teacher is None and seen == []  # a method without a teacher never runs one
    else:
        assert seen, f"{name}: the teacher was never run during training"
        assert not any(training for training, _ in seen), f"{name}: the teacher ran in train mode"
        assert not any(grad for _, grad in seen), f"{name}: the teacher ran with requires_grad parameters"
        assert not any(m.training for m in teacher.modules())
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, weights[k]), f"{name}: the teacher's {k} changed"
