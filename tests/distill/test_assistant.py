"""Teacher assistant: the chain teacher -> assistant -> student, its parameters and its records."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xkd.config import ConfigError
from xkd.data.base import Batch
from xkd.distill import TeacherAssistant, build_distiller
from xkd.distill.base import DistillContext
from xkd.files import read_json
from xkd.plan import load_config
from xkd.runner import run


def net(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 3))


ASSISTANT = {"name": "kdfmv_cnn", "params": {"widths": [4, 8]}}


def test_student_learns_from_the_assistant_with_the_inner_method():
    student, assistant = net(0), net(1, 16)
    before = [p.clone() for p in assistant.parameters()]
    d = build_distiller(
        "teacher_assistant",
        student,
        assistant,
        {"assistant": ASSISTANT, "distiller": "hinton_kd", "params": {"alpha": 0.0, "temperature": 2.0}},
    )
    assert isinstance(d, TeacherAssistant) and d.teacher is assistant and d.inner.teacher is assistant
    assert d.student is student and set(d.trainable_modules()) == {"student"}
    batch = Batch(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))
    opt = torch.optim.SGD(d.trainable_modules().parameters(), lr=0.5)
    losses = []
    d.train()
    for _ in range(5):
        logits, terms = d(batch)
        assert set(terms) == {"ce", "kd"}
        loss = sum(terms.values())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    # alpha = 0: the whole loss is the KD term towards the assistant's distribution
    with torch.no_grad():
        t = 2.0
        ps = torch.log_softmax(student(batch.images) / t, 1)
        pt = torch.log_softmax(assistant(batch.images) / t, 1)
        expected = (pt.exp() * (pt - ps)).sum(1).mean() * t * t
        assert torch.allclose(d(batch)[1]["kd"], expected, atol=1e-5)
    assert not assistant.training
    assert all(torch.equal(a, b) for a, b in zip(before, assistant.parameters()))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "the assistant's model is required"),
        ({"assistant": {"name": "vgg"}}, r"assistant.name: unknown model 'vgg'; registered: "),
        ({"assistant": ASSISTANT, "distiller": "teacher_assistant"}, "a chain of assistants is not supported"),
        ({"assistant": ASSISTANT, "assistant_distiller": "fitnet"}, "unknown distiller 'fitnet'"),
        ({"assistant": ASSISTANT, "params": {"alpha": 2.0}}, "alpha"),
    ],
)
def test_bad_parameters_are_named(params, message):
    with pytest.raises(ConfigError, match=message):
        build_distiller("teacher_assistant", net(0), net(1), params)


@pytest.mark.slow
def test_pipeline_trains_the_assistant_first_and_records_it(tiny_args):
    cfg = load_config(
        None,
        [
            *tiny_args,
            "students=[{name: ta, distiller: teacher_assistant, params: {assistant: {name: kdfmv_cnn, "
            "params: {widths: [8, 8, 8]}}, distiller: hinton_kd}}]",
            "evaluation.explainers=[{name: grad_cam}]",
            "evaluation.metrics=[fidelity, rank_correlation]",
        ],
    )
    run_dir = run(cfg, progress=False)
    for rel in ("checkpoints/ta.assistant/best.pt", "checkpoints/ta/best.pt", "checkpoints/ta/last.pt"):
        assert (run_dir / rel).is_file(), rel
    rec = read_json(run_dir / "records/models.json")["models"]["ta"]
    a = rec["assistant"]
    assert a["model"] == "kdfmv_cnn" and a["distiller"] == "hinton_kd" and 0.0 <= a["test"]["accuracy"] <= 1.0
    assert a["params"] > rec["params"]  # widths [8, 8, 8] vs the student's [4, 8, 8]
    assert 0.0 <= rec["test_last"]["accuracy"] <= 1.0
    assert rec["distiller"] == "teacher_assistant"


def test_ddp_skips_the_inner_methods_memory_banks_through_the_wrapper(tiny_pair, tiny_data):
    """DDP reads the ignore list of the module it wraps, the assistant wrapper: CRD's banks (kept equal
    on every rank by gathering the updates) must not be broadcast from rank 0 at every step."""
    student, teacher = tiny_pair
    context = DistillContext(sample=torch.zeros(2, 1, 16, 16), train=tiny_data(n=24))
    d = build_distiller(
        "teacher_assistant", student, teacher, {"assistant": ASSISTANT, "distiller": "crd", "params": {"feat_dim": 8}},
        context,
    )  # fmt: skip
    ignored = set(d._ddp_params_and_buffers_to_ignore)
    assert {"inner.head.memory_s", "inner.head.memory_t"} <= ignored
    buffers = {n for n, _ in d.named_buffers()}
    assert ignored <= buffers  # names DDP finds on the wrapper
