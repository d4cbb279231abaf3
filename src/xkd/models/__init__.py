"""Teachers and students (registered builders) and feature hooks by module path."""

from xkd.models.hooks import LayerNotFoundError, capture_features, conv_layer_paths, default_layer, get_module
from xkd.models.zoo import PretrainedUnavailableError, build_model, count_parameters

__all__ = [
    "LayerNotFoundError",
    "PretrainedUnavailableError",
    "build_model",
    "capture_features",
    "conv_layer_paths",
    "count_parameters",
    "default_layer",
    "get_module",
]
