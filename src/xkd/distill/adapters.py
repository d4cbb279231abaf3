"""Shared helpers of the feature-based distillers: layer pairs, shape probing, resampling, adapters.

Stable API (imported by ``feature.py``, the relation methods, MED-TEX and XDistillation):

- :data:`LayerPairs`, :func:`check_layer_pairs`, :func:`resolve_layer_pairs`: methods take
  ``layers: [[student_path, teacher_path], ...]``; ``None`` (the default) means one pair made of
  each model's :func:`xkd.models.hooks.default_layer` (the model's declared ``xkd_default_layer``,
  otherwise its last ``nn.Conv2d`` -- the last conv block).
- :func:`probe_shapes`, :func:`probe_features`: feature shapes (or the features) by module path from
  one no-grad, eval-mode dry run.
- :func:`match_size`: **xkd resamples the STUDENT feature map to the teacher's h x w** (bilinear)
  when the two spatial sizes differ; the teacher's features are never changed.
- :func:`conv_adapter`: a 1x1 convolution (optionally followed by BatchNorm) mapping student
  channels to teacher channels (the FitNets regressor, the AB connector).
- :func:`linear_adapter`: the same for flattened features ``(N, D)`` of linear layers.
- :func:`feature_dims`: the channels (or width) of a probed feature shape, with a clear error for a
  shape a method cannot use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.errors import ConfigError
from xkd.models.hooks import capture_features, default_layer, get_module

LayerPairs = list[list[str]]
"""Type of a method's ``layers`` parameter: ``[[student_path, teacher_path], ...]``."""


def check_layer_pairs(layers: Sequence[Sequence[str]] | None, key: str = "layers") -> None:
    """Validate the form of a ``layers`` parameter (``None`` or a non-empty list of 2-item pairs of
    non-empty strings); raises :class:`~xkd.config.ConfigError`. Whether the paths exist is checked
    against the models by :func:`resolve_layer_pairs`."""
    if layers is None:
        return
    if len(layers) == 0:
        raise ConfigError(f"{key} must be null (default layers) or a non-empty list of [student, teacher] pairs")
    for i, pair in enumerate(layers):
        if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise ConfigError(f"{key}[{i}] must be a pair [student_path, teacher_path] of module paths, got {pair!r}")


def resolve_layer_pairs(
    layers: Sequence[Sequence[str]] | None, student: nn.Module, teacher: nn.Module
) -> list[tuple[str, str]]:
    """The ``(student_path, teacher_path)`` pairs of a method.

    ``None`` gives ``[(default_layer(student), default_layer(teacher))]``. Every path is looked up
    now, so a wrong name fails at construction with
    :class:`~xkd.models.hooks.LayerNotFoundError` listing the model's module paths.
    """
    if layers is None:
        return [(default_layer(student), default_layer(teacher))]
    check_layer_pairs(layers)
    pairs = []
    for s_path, t_path in layers:
        get_module(student, s_path)
        get_module(teacher, t_path)
        pairs.append((s_path, t_path))
    return pairs


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def probe_shapes(model: nn.Module, paths: Sequence[str], sample: Tensor) -> dict[str, torch.Size]:
    """Shapes of the outputs of the modules at ``paths`` for input ``sample`` (a dry run, see
    :func:`probe_features`)."""
    return {p: f.shape for p, f in probe_features(model, paths, sample).items()}


@torch.no_grad()
def probe_features(model: nn.Module, paths: Sequence[str], sample: Tensor) -> dict[str, Tensor]:
    """The outputs of the modules at ``paths`` for input ``sample`` (a dry run).

    The model runs once in eval mode (BatchNorm statistics untouched) without gradients, on the
    model's device; the train/eval flags of every sub-module are restored afterwards.
    """
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with capture_features(model, list(paths), detach=True) as feats:
            model(sample.to(model_device(model)))
    finally:
        for m, flag in flags.items():
            m.training = flag
    missing = [p for p in paths if p not in feats]
    if missing:
        raise RuntimeError(f"layers {missing} of {type(model).__name__} were not called during a forward pass")
    for p in paths:
        if not isinstance(feats[p], Tensor):
            raise TypeError(f"layer {p!r} of {type(model).__name__} returns {type(feats[p]).__name__}, not a tensor")
    return {p: feats[p] for p in paths}


def match_size(student_feat: Tensor, size: Sequence[int] | torch.Size) -> Tensor:
    """Resample a student feature map ``(N, C, h, w)`` to the teacher's spatial size.

    ``size`` is ``(H, W)`` or any shape ending in ``H, W`` (e.g. the teacher feature's ``.shape``).
    xkd's rule for every method that compares maps position by position (FitNets, AT, NST, AB,
    VID, MED-TEX): the **student** map is resampled **bilinearly** (``align_corners=False``) to the
    **teacher's** ``H x W``; equal sizes return the input unchanged. (RepDistiller instead
    average-pools whichever map is larger.) Non-4-D features of different shapes are an error.
    """
    hw = tuple(int(v) for v in size[-2:])
    if student_feat.ndim != 4:
        if tuple(student_feat.shape[-2:]) == hw:
            return student_feat
        raise ValueError(
            f"cannot match a student feature of shape {tuple(student_feat.shape)} to spatial size {hw}: "
            "only (N, C, H, W) feature maps are resampled; choose conv layers for this method"
        )
    if tuple(student_feat.shape[-2:]) == hw:
        return student_feat
    return F.interpolate(student_feat, size=hw, mode="bilinear", align_corners=False)


def conv_adapter(c_in: int, c_out: int, bn: bool = True) -> nn.Sequential:
    """A 1x1 convolution ``c_in -> c_out`` (no bias when followed by BN), optionally + BatchNorm2d.

    Used as the FitNets regressor (Romero et al. 2015, eq. 3 with a 1x1 kernel; FitNets appends a
    ReLU when the hint is non-negative) and the AB connector (Heo et al. 2019, §3.3: 1x1 conv + BN).
    Kaiming-initialised."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=not bn)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    layers: list[nn.Module] = [conv]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers)


def linear_adapter(d_in: int, d_out: int, bn: bool = False) -> nn.Sequential:
    """A linear map ``d_in -> d_out`` for flattened ``(N, D)`` features (no bias when followed by BN),
    optionally + BatchNorm1d: the FitNets regressor / AB connector for a linear layer. Kaiming-initialised
    like :func:`conv_adapter`. BN is off by default: BatchNorm1d cannot train on a batch of one sample
    (a last partial batch), while BatchNorm2d can as long as the map has more than one position."""
    linear = nn.Linear(d_in, d_out, bias=not bn)
    nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="relu")
    layers: list[nn.Module] = [linear]
    if bn:
        layers.append(nn.BatchNorm1d(d_out))
    return nn.Sequential(*layers)


FLAT_FEATURE_METHODS = ("fitnets", "ab", "vid")
"""Methods that also take flattened ``(N, D)`` features of linear layers (through a linear adapter)."""


def feature_dims(shape: torch.Size, path: str, role: str, method: str = "this method", spatial: bool = True) -> int:
    """Channels ``C`` of a probed ``(N, C, H, W)`` feature shape, or the width ``D`` of an ``(N, D)``
    one when the method also takes flattened features (``spatial=False``); a clear error otherwise."""
    if len(shape) == 4 or (len(shape) == 2 and not spatial):
        return int(shape[1])
    needs = "(N, C, H, W) feature maps (choose a conv layer)" if spatial else "(N, C, H, W) or (N, D) features"
    raise ValueError(
        f"{method}: {role} layer {path!r} outputs shape {tuple(shape)}; {method} needs {needs}. Methods that "
        f"also take flattened (N, D) features of linear layers: {', '.join(FLAT_FEATURE_METHODS)}"
    )


def channels_of(shape: torch.Size, path: str, role: str) -> int:
    """The channel count of a probed ``(N, C, H, W)`` feature shape; a clear error otherwise."""
    return feature_dims(shape, path, role)
