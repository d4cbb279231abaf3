"""Explainers: (model, images, targets) -> :class:`Attribution` (DESIGN.md rule 4).

Importing this package registers the built-in explainers (``grad_cam``, ``feature_maps``).
"""

from xkd.explain.base import Attribution, Explainer, build_explainer, check_maps, explainer_params, normalize_maps
from xkd.explain.feature_maps import FeatureMaps
from xkd.explain.gradcam import CAMExplainer, GradCAM

__all__ = [
    "Attribution",
    "CAMExplainer",
    "Explainer",
    "FeatureMaps",
    "GradCAM",
    "build_explainer",
    "check_maps",
    "explainer_params",
    "normalize_maps",
]
