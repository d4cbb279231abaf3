"""Explainers: (model, images, targets) -> :class:`Attribution` (float32 maps (N, H, W) at input
resolution, finite; normalisation is a separate step).

Importing this package registers the built-in explainers: ``grad_cam``, ``grad_cam_pp``, ``layer_cam``,
``feature_maps``, ``integrated_gradients``, ``gradient_shap``, ``deep_shap``, ``occlusion``,
``kernel_shap``, ``lime``, ``unicam`` and ``medtex_theta``; any of them in superpixel form as ``<name>+superpixel``.
"""

from xkd.explain.base import Attribution, Explainer, build_explainer, check_maps, explainer_params, normalize_maps
from xkd.explain.feature_maps import FeatureMaps
from xkd.explain.gradcam import CAMExplainer, GradCAM, GradCAMPlusPlus, LayerCAM
from xkd.explain.gradients import DeepSHAP, GradientSHAP, IntegratedGradients
from xkd.explain.occlusion import Occlusion
from xkd.explain.perturbation import LIME, KernelSHAP
from xkd.explain.theta import MedTexTheta, ThetaUnavailableError
from xkd.explain.unicam import UniCAM

__all__ = [
    "DeepSHAP",
    "GradCAMPlusPlus",
    "GradientSHAP",
    "IntegratedGradients",
    "KernelSHAP",
    "LIME",
    "LayerCAM",
    "MedTexTheta",
    "ThetaUnavailableError",
    "Occlusion",
    "UniCAM",
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
