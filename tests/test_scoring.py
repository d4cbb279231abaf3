"""Scoring one explainer's maps: undefined images are counted in the record, not scored 0; superpixel
metrics read superpixel-form maps once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xkd.config import EvaluationConfig
from xkd.explain.base import resolve_explainer
from xkd.report.sections import explainer_tables
from xkd.scoring import Scorer, explain, prediction_maps, run_inputs, score_maps


def test_empty_masks_and_maps_without_positive_mass_are_counted_as_undefined():
    ev = EvaluationConfig(metrics=["pointing_game", "mask_mass"])
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = 1.0  # image 0: evidence inside its mask; image 1: an all-zero map
    maps[2, 3, 3] = 1.0  # image 2: an empty mask
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, :2, :2] = True
    sc = Scorer(ev)
    values = run_inputs(sc, torch.zeros(3, 1, 4, 4), torch.zeros(3).long(), masks, ["a"])
    out = score_maps(sc, {**values, "model": nn.Identity(), "maps": maps})
    assert out["undefined"] == {"empty_mask": 1, "no_positive_attribution": 1}
    assert out["mask_mass"] == pytest.approx(1.0)  # the mean over the one defined image, not (1 + 0 + 0) / 3
    tables = explainer_tables(["teacher"], {"teacher": {}}, {"per_model": {"teacher": {"grad_cam": out}}}, "grad_cam")
    assert "1 image(s) with an empty mask" in tables[0]["caption"]
    assert "no positive attribution) for teacher 1 image(s)" in tables[0]["caption"]


def test_superpixel_form_explainers_are_scored_per_superpixel_value():
    ev = EvaluationConfig(metrics=["superpixel_mse"])
    seg = torch.zeros(1, 4, 4, dtype=torch.long)
    seg[0, 2:, 2:] = 1  # superpixels of 12 and 4 pixels
    teacher = torch.where(seg == 0, 1.0, 2.0).float()
    student = torch.where(seg == 0, 1.0, -2.0).float()
    both = torch.ones(1, dtype=torch.bool)
    sc = Scorer(ev)
    values = {
        "teacher_maps": teacher,
        "student_maps": student,
        "segments": seg,
        "both_correct": both,
        "same_prediction": both,
    }
    pixel = sc.score(sc.of("agreement"), {**values, "map_form": "pixel"})["superpixel_mse"]
    read_once = sc.score(sc.of("agreement"), {**values, "map_form": "superpixel"})["superpixel_mse"]
    # normalised by the largest |value|: pixel form sums (12, 8) vs (12, -8) -> (1, 2/3) vs (1, -2/3)
    assert pixel == pytest.approx(((4 / 3) ** 2) / 2)
    # superpixel form reads (1, 2) vs (1, -2) -> (1/2, 1) vs (1/2, -1)
    assert read_once == pytest.approx(4 / 2)


def test_nan_attributions_in_a_run_name_the_test_split_images(tiny_config, monkeypatch):
    import xkd.evaluate
    from xkd.explain.base import NonFiniteAttributionError, check_maps
    from xkd.runner import run

    def nan_for_images_1_and_3(*args, **kwargs):
        maps = torch.zeros(5, 4, 4)
        maps[[1, 3]] = float("nan")
        check_maps(maps, method="grad_cam")

    monkeypatch.setattr(xkd.evaluate, "explain_and_score", nan_for_images_1_and_3)
    with pytest.raises(NonFiniteAttributionError, match="'grad_cam'.*image index 1, 3 of the batch") as info:
        run(tiny_config, progress=False)
    from xkd.data import build_dataset
    from xkd.data.base import dataset_labels
    from xkd.evaluate import select_indices  # the images the run explains, in order

    data = build_dataset(tiny_config.data)
    idx = select_indices(dataset_labels(data.test), tiny_config.evaluation.num_images, tiny_config.seed)
    assert info.value.indices == [int(idx[1]), int(idx[3])]
    assert f"test-split indices: {int(idx[1])}, {int(idx[3])}" in str(info.value)


class HalfMeans(nn.Module):
    """Two classes: logit 0 = mean of the left half, logit 1 = mean of the right half."""

    num_classes = 2

    def forward(self, x):
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean(dim=(1, 2, 3)), x[..., w:].mean(dim=(1, 2, 3))], dim=1)


def test_fidelity_scores_maps_of_the_class_it_checks_the_prediction(tmp_path):
    # true class 0, but the right half is brighter: the model predicts 1. Keeping the top half of the
    # pixels of a class-1 map keeps the right half and the prediction survives; a class-0 map keeps
    # the left half, and the check (does the PREDICTED class survive?) fails for a reason that has
    # nothing to do with the map's quality.
    x = torch.full((1, 1, 4, 4), 0.2)
    x[..., 2:] = 0.8
    label, model = torch.tensor([0]), HalfMeans()
    spec = resolve_explainer("integrated_gradients", {"n_steps": 8})
    sc = Scorer(EvaluationConfig(metrics=["fidelity"], fidelity_keep=0.5))
    values = run_inputs(sc, x, label, None, ["a", "b"])
    true_maps = explain(spec, model, x, label)
    preds = model(x).argmax(1)
    assert int(preds) == 1
    pred_maps = prediction_maps(sc, spec, model, x, label, preds, true_maps, {})
    assert pred_maps[0, :, 2:].sum() > pred_maps[0, :, :2].sum()  # the class-1 map points at the right half
    ours = score_maps(sc, {**values, "model": model, "maps": true_maps, "prediction_maps": pred_maps})
    assert ours["fidelity"]["mean"] == 1.0
    mismatched = score_maps(sc, {**values, "model": model, "maps": true_maps, "prediction_maps": true_maps})
    assert mismatched["fidelity"]["mean"] == 0.0  # what scoring the true-class map gave


def test_superpixel_mse_headline_uses_images_both_models_assign_the_same_class():
    seg = torch.zeros(2, 2, 2, dtype=torch.long)
    seg[:, :, 1] = 1  # two superpixels of 2 pixels per image
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    student = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    sc = Scorer(EvaluationConfig(metrics=["superpixel_mse"]))
    values = {"teacher_maps": teacher, "student_maps": student, "segments": seg, "map_form": "pixel",
              "both_correct": torch.tensor([True, True]), "same_prediction": torch.tensor([True, False])}  # fmt: skip
    out = sc.score(sc.of("agreement"), values)
    # normalised per image by the largest |sum|: image 0 (1, 0) vs (1, 0) -> 0; image 1 (1, 0) vs (0, 1) -> 1
    assert out["superpixel_mse"] == 0.0 and out["superpixel_mse_images"] == 1
    assert out["superpixel_mse_all_images"] == pytest.approx((0.0 + 1.0) / 2)


def test_unicam_kd_vs_base_maps_use_the_scratch_student_as_base_and_say_so(tmp_path, make_tiny_args):
    from xkd.files import read_json
    from xkd.plan import load_config
    from xkd.runner import run

    explainers = (
        "evaluation.explainers=[{name: unicam, label: kd_given_base, params: {kind: kd_given_base}}, "
        "{name: unicam+superpixel, label: base_given_kd_sp, params: {kind: base_given_kd}}]"
    )
    args = make_tiny_args(tmp_path, explainers, "evaluation.metrics=[rank_correlation, mask_mass]")
    run_dir = run(load_config(None, args), progress=False)
    per_model = read_json(run_dir / "records" / "explanations.json")["per_model"]
    for key in ("kd_given_base", "base_given_kd_sp"):
        assert per_model["kd"][key]["base_model"] == "scratch"  # the KD student measured against scratch
        assert key not in per_model["scratch"]  # scratch against itself would measure nothing
        assert key not in per_model["teacher"]  # a pair explainer: students only
    samples = read_json(run_dir / "records" / "samples.json")
    assert "kd_given_base" in samples["explainers"]
    assert (run_dir / "report.html").is_file()


def test_closer_to_teacher_gets_the_paired_independent_students_maps_and_skips_the_rest():
    from types import SimpleNamespace

    from xkd.scoring import independent_inputs

    g = torch.Generator().manual_seed(0)
    teacher = torch.rand(6, 4, 4, generator=g)
    maps = {"teacher": teacher, "kd": teacher + 0.01, "scratch": torch.rand(6, 4, 4, generator=g)}
    plan = SimpleNamespace(independent={"kd": "scratch"})  # as resolve() pairs them
    sc = Scorer(EvaluationConfig(metrics=["closer_to_teacher", "map_pearson"]))
    for role, scored in (("kd", True), ("scratch", False)):
        values = {"teacher_maps": teacher, "student_maps": maps[role], **independent_inputs(plan, role, maps)}
        out = sc.score(sc.of("agreement"), values)
        assert "map_pearson" in out  # the other agreement metrics are unaffected
        assert ("closer_to_teacher" in out) is scored  # the independent student is not scored against itself
    kd = sc.score(sc.of("agreement"), {"teacher_maps": teacher, "student_maps": maps["kd"],
                                       **independent_inputs(plan, "kd", maps)})["closer_to_teacher"]  # fmt: skip
    assert kd["share"] == 1.0 and kd["images"] == 6 and kd["independent"] == "scratch"
    assert independent_inputs(plan, "kd", {"teacher": teacher, "kd": teacher}) == {
        "independent_maps": None,  # the independent student has no maps of this explainer
        "independent_role": None,
    }
    # the metric's own parameters pass through evaluation.metric_params
    rank = Scorer(
        EvaluationConfig(metrics=["closer_to_teacher"], metric_params={"closer_to_teacher": {"distance": "rank"}})
    )
    values = {"teacher_maps": teacher, "student_maps": maps["kd"], **independent_inputs(plan, "kd", maps)}
    assert rank.score(rank.of("agreement"), values)["closer_to_teacher"]["distance"] == "rank"
