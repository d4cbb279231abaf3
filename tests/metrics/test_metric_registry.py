"""Every metric is registered once with its metadata; the fixed names exist."""

from __future__ import annotations

import pytest
import torch

import xkd.explain  # noqa: F401
import xkd.metrics  # noqa: F401
import xkd.metrics.sanity  # noqa: F401  (until xkd.metrics imports them)
import xkd.metrics.superpixel  # noqa: F401
from xkd.metrics import as_result, flops
from xkd.metrics.agreement import map_spearman
from xkd.metrics.base import MetricInfo
from xkd.registry import EXPLAINERS, METRICS

FIXED = [
    "accuracy",
    "macro_f1",
    "posthoc_agreement",
    "fidelity",
    "pointing_game",
    "top_k_iou",
    "flops",
    "params",
    "met",
]
# the explanation metrics the issue names, with their direction
DIRECTIONS = {
    "deletion_auc": False,
    "insertion_auc": True,
    "road": True,
    "pointing_game": True,
    "top_k_iou": True,
    "top_k_dice": True,
    "mask_mass": True,
    "rank_correlation": True,
    "top_k_agreement": True,
    "superpixel_mse": False,
    "superpixel_sign_agreement": True,
    "randomisation_sanity": False,
    "map_pearson": True,
    "loss": False,
}


@pytest.mark.parametrize("name", FIXED + list(DIRECTIONS))
def test_metric_is_registered_with_metadata(name):
    info = METRICS.get(name)
    assert isinstance(info, MetricInfo) and info.name == name and callable(info.fn)
    assert info.category in {
        "classification",
        "agreement",
        "cost",
        "faithfulness",
        "localisation",
        "sanity",
        "transfer",
    }
    assert info.description
    if name in DIRECTIONS:
        assert info.higher_is_better is DIRECTIONS[name]


def test_needs_name_what_a_metric_consumes():
    assert set(METRICS.get("pointing_game").needs) == {"maps", "masks"}
    assert METRICS.get("top_k_agreement").needs == ("teacher_maps", "student_maps", "agreement_top_k")
    assert "teacher_predictions" in METRICS.get("posthoc_agreement").needs
    # segments and map_form: superpixel-form maps are read once per superpixel
    assert set(METRICS.get("mask_mass").needs) == {"maps", "masks", "segments", "map_form"}
    assert {"teacher_maps", "student_maps", "segments"} <= set(METRICS.get("superpixel_mse").needs)
    assert "both_correct" in METRICS.get("superpixel_sign_agreement").needs
    assert "make_explainer" in METRICS.get("randomisation_sanity").needs


def test_map_spearman_is_registered_as_rank_correlation():
    assert METRICS.get("rank_correlation").fn is map_spearman
    assert "map_spearman" not in METRICS.names()


def test_explainers_registered():
    assert {"grad_cam", "feature_maps"} <= set(EXPLAINERS.names())


def test_as_result_takes_the_headline_value():
    r = as_result("flops", flops(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 5)), (1, 1, 10)))
    assert (r.name, r.value, r.higher_is_better, r.details["macs"]) == ("flops", 100, False, 50)
    assert as_result("accuracy", 0.5).value == 0.5
