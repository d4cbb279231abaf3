"""The public Python API in one place: build a dataset, a teacher, a student, a distiller, train,
explain, score.

Example:
    >>> import xkd
    >>> from xkd.config import DataConfig, ModelConfig, TrainConfig
    >>> data = xkd.build_dataset(DataConfig("digits", image_size=16))
    >>> teacher = xkd.build_model(ModelConfig("cifar_resnet"), data.num_classes, 1, 16)
    >>> xkd.Trainer(xkd.build_distiller("scratch", teacher), data.train, data.val, TrainConfig(epochs=1)).fit()
"""

import xkd.studies  # noqa: F401  (registers the studies)
from xkd.comparison import compare
from xkd.config import RunConfig
from xkd.data import DataBundle, build_dataset, make_loader
from xkd.distill import Distiller, build_distiller
from xkd.engine import Trainer
from xkd.explain import Attribution, build_explainer, normalize_maps
from xkd.metrics import agreement as explanation_agreement
from xkd.metrics import classification, cost, faithfulness, localisation
from xkd.metrics.base import MetricInfo
from xkd.models import build_model, capture_features
from xkd.plan import load_config, resolve
from xkd.registry import ALL_REGISTRIES, STUDIES
from xkd.report import render_dir
from xkd.runner import run
from xkd.sweeps import sweep
from xkd.user_images import explain_images

__all__ = [
    "ALL_REGISTRIES",
    "STUDIES",
    "MetricInfo",
    "explain_images",
    "render_dir",
    "resolve",
    "Attribution",
    "DataBundle",
    "Distiller",
    "RunConfig",
    "Trainer",
    "build_dataset",
    "build_distiller",
    "build_explainer",
    "build_model",
    "capture_features",
    "classification",
    "compare",
    "cost",
    "explanation_agreement",
    "faithfulness",
    "load_config",
    "localisation",
    "make_loader",
    "normalize_maps",
    "run",
    "sweep",
]
