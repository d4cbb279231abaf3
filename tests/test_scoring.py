"""Scoring one explainer's maps: undefined images are counted in the record, not scored 0; superpixel
metrics read superpixel-form maps once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xkd.config import EvaluationConfig
from xkd.report.sections import explainer_tables
from xkd.scoring import Scorer, run_inputs, score_maps


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
    values = {"teacher_maps": teacher, "student_maps": student, "segments": seg, "both_correct": both}
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
    from xkd.evaluate import all_labels, select_indices  # the images the run explains, in order

    data = build_dataset(tiny_config.data)
    idx = select_indices(all_labels(data.test), tiny_config.evaluation.num_images, tiny_config.seed)
    assert info.value.indices == [int(idx[1]), int(idx[3])]
    assert f"test-split indices: {int(idx[1])}, {int(idx[3])}" in str(info.value)
