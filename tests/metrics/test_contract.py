"""The metric contract for every metric a run scores (scopes ``model``, ``agreement``, ``timing``,
``transfer``): called through the scoring loop (:mod:`xkd.scoring`) with tiny models and inputs on
the test's device, each one is scored, and its record holds plain finite numbers (or None), never
tensors, also with images whose localisation or agreement is undefined among the inputs.

A metric registered with one of these scopes is picked up here with no entry to add.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import xkd.api  # noqa: F401  (registers every model, explainer and metric, as users see them)
from xkd.config import EvaluationConfig
from xkd.explain.base import resolve_explainer
from xkd.metrics.base import declared
from xkd.scoring import Scorer, explain, prediction_maps, run_inputs, score_maps, score_transfer

pytestmark = pytest.mark.usefixtures("one_thread")

SCOPES = ("model", "agreement", "timing", "transfer")
METRICS = {m.name: m for m in declared(*SCOPES)}
CLASS_NAMES = ["a", "b", "c"]


def leaves(record: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every scalar of a (nested) record with where it is."""
    if isinstance(record, dict):
        return [x for k, v in record.items() for x in leaves(v, f"{path}.{k}")]
    if isinstance(record, (list, tuple)):
        return [x for i, v in enumerate(record) for x in leaves(v, f"{path}[{i}]")]
    return [(path, record)]


@pytest.fixture
def inputs(tiny_model, device):
    """Four 1x16x16 images on ``device``; image 3 has an empty mask (localisation undefined there)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 16, 16, generator=g)
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:3, 2:8, 3:9] = True
    return SimpleNamespace(
        images=images.to(device),
        labels=torch.tensor([0, 1, 2, 0]).to(device),
        masks=masks.to(device),
        student=tiny_model("student", 0, widths=[4, 8]).to(device).eval(),
        teacher=tiny_model("teacher", 1).to(device).eval(),
        random_labels=tiny_model("student", 2, widths=[4, 8]).to(device).eval(),
    )


def score(name: str, x: SimpleNamespace) -> dict[str, Any]:
    """``name``'s record on ``x``, as the scoring loop computes it for its scope."""
    info = METRICS[name]
    sc = Scorer(EvaluationConfig(metrics=[name], batch_size=4, met_images=2, sanity_images=2))
    common = run_inputs(sc, x.images, x.labels, x.masks, CLASS_NAMES)
    spec = resolve_explainer("grad_cam")
    maps = explain(spec, x.student, x.images, x.labels)
    assert maps.device == x.images.device
    if info.scope == "model":
        with torch.no_grad():
            preds = x.student(x.images).argmax(1)
        values = {
            **common,
            "model": x.student,
            "maps": maps,
            "prediction_maps": prediction_maps(sc, spec, x.student, x.images, x.labels, preds, maps, {}),
            "make_explainer": spec.build,
            "random_label_model": x.random_labels,
        }
        return score_maps(sc, values)
    if info.scope == "agreement":
        values = {
            **common,
            "teacher_maps": explain(spec, x.teacher, x.images, x.labels),
            "student_maps": maps,
            # the tiny models are untrained: say which images both got right (image 3: neither)
            "both_correct": torch.tensor([True, True, True, False]).to(x.images.device),
            "same_prediction": torch.tensor([True, True, False, True]).to(x.images.device),
            "map_form": spec.map_form,
            # an independent student of the student's architecture (closer_to_teacher)
            "independent_maps": explain(spec, x.random_labels, x.images, x.labels),
            "independent_role": "independent",
        }
        return sc.score(sc.of("agreement"), values)
    if info.scope == "timing":
        values = {**common, "model": x.student, "maps": maps, "make_explainer": spec.build}
        result = sc.call(info, values)
        return {} if result is None else info.to_record(result)
    teacher = SimpleNamespace(role="teacher", model=x.teacher)
    student = SimpleNamespace(role="student", model=x.student)
    return score_transfer(sc, common, teacher, [student], x.images)["student"]


def test_every_scope_has_metrics():
    assert {m.scope for m in METRICS.values()} == set(SCOPES)


@pytest.mark.parametrize("name", list(METRICS))
def test_every_metric_is_scored_with_finite_plain_numbers(name, inputs):
    record = score(name, inputs)
    info = METRICS[name]
    assert set(record) - {"undefined", "student_layer", "teacher_layer"}, f"{name} was not scored: {record}"
    for column in info.columns:
        assert column.key in record, f"{name}: the record lacks its column {column.key!r}: {record}"
    for path, v in leaves(record):
        assert v is None or isinstance(v, (bool, int, float, str)), f"{name}{path} is a {type(v).__name__}"
        if isinstance(v, float):
            assert math.isfinite(v), f"{name}{path} = {v}"


def test_transfer_scores_read_the_teachers_features_once_for_every_student(inputs):
    x = inputs
    sc = Scorer(EvaluationConfig(metrics=["fss", "rs"], batch_size=4))
    common = run_inputs(sc, x.images, x.labels, x.masks, CLASS_NAMES)
    calls = []
    handle = x.teacher.register_forward_hook(lambda *_: calls.append(1))
    teacher = SimpleNamespace(role="teacher", model=x.teacher)
    students = [
        SimpleNamespace(role=r, model=m) for r, m in (("a", x.student), ("b", x.random_labels), ("c", x.student))
    ]
    try:
        out = score_transfer(sc, common, teacher, students, x.images)
    finally:
        handle.remove()
    assert len(calls) == 1  # 4 images, batch 4: one forward of the teacher for the three students
    assert out["a"] == out["c"] and out["a"] != out["b"]
    alone = score_transfer(sc, common, teacher, students[1:2], x.images)
    assert alone["b"] == out["b"]
