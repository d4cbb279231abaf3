"""Metrics: plain functions of tensors, each registered in :data:`xkd.registry.METRICS` with its
metadata (:class:`~xkd.metrics.base.MetricInfo`). Importing this package registers them all.

Return convention: a metric returns a number, or a dict whose entry under the metric's own registry
name is the headline value and whose other entries are details (e.g. ``flops`` returns
``{"flops", "macs", ...}``, ``fidelity`` its per-class table). :func:`as_result` turns either form
into a :class:`~xkd.metrics.base.MetricResult`.
"""

from __future__ import annotations

from typing import Any

from xkd.metrics.agreement import map_pearson, map_spearman, top_k_iou_maps, top_k_mask, top_n_mask
from xkd.metrics.base import MetricInfo, MetricResult, metric
from xkd.metrics.classification import (
    accuracy,
    confusion,
    confusion_matrix,
    evaluate_model,
    macro_f1,
    mean_cross_entropy,
    posthoc_agreement,
)
from xkd.metrics.closer import closer_counts, closer_to_teacher
from xkd.metrics.cost import flops, mean_explain_time, parameter_count
from xkd.metrics.dissection import concept_detectors  # noqa: F401  (registers the metric)
from xkd.metrics.faithfulness import deletion_auc, fidelity, insertion_auc, perturbation_curves
from xkd.metrics.localisation import mask_mass, medtex_k_values, pointing_game, top_k_dice, top_k_iou
from xkd.metrics.ranking import saliency_ranks
from xkd.metrics.road import linear_imputation, road
from xkd.metrics.sanity import data_randomisation_sanity, randomisation_sanity
from xkd.metrics.superpixel import superpixel_mse, superpixel_sign_agreement
from xkd.metrics.transfer import fss, pair_features, rs, transfer_scores
from xkd.registry import METRICS


def as_result(name: str, value: Any) -> MetricResult:
    """Wrap the return value of registered metric ``name`` as a :class:`MetricResult`."""
    info: MetricInfo = METRICS.get(name)
    if isinstance(value, dict):
        details = {k: v for k, v in value.items() if k != name}
        return MetricResult(name, value.get(name), info.higher_is_better, details)
    return MetricResult(name, value, info.higher_is_better)


__all__ = [
    "fss",
    "pair_features",
    "rs",
    "transfer_scores",
    "data_randomisation_sanity",
    "linear_imputation",
    "mask_mass",
    "randomisation_sanity",
    "road",
    "superpixel_mse",
    "superpixel_sign_agreement",
    "top_k_dice",
    "MetricInfo",
    "MetricResult",
    "accuracy",
    "as_result",
    "confusion",
    "closer_counts",
    "closer_to_teacher",
    "confusion_matrix",
    "deletion_auc",
    "evaluate_model",
    "fidelity",
    "flops",
    "insertion_auc",
    "macro_f1",
    "map_pearson",
    "map_spearman",
    "mean_cross_entropy",
    "mean_explain_time",
    "medtex_k_values",
    "metric",
    "parameter_count",
    "perturbation_curves",
    "pointing_game",
    "posthoc_agreement",
    "saliency_ranks",
    "top_k_iou",
    "top_k_iou_maps",
    "top_k_mask",
    "top_n_mask",
]
