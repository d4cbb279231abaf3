"""The explainer contract (DESIGN.md rule 4).

An explainer maps ``(model, images, targets)`` to an :class:`Attribution`: float32 maps of shape
``(N, H, W)`` at input resolution, finite. Normalisation is a separate, explicit step
(:func:`normalize_maps`). Explainers are context managers: every hook they place is removed on exit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xkd.config import from_dict
from xkd.registry import EXPLAINERS


@dataclass
class Attribution:
    """Explanation maps and where they came from.

    Attributes:
        maps: float32 tensor (N, H, W) at input resolution, finite.
        method: registry name of the explainer.
        layer: module path the maps were computed at (None for input-level methods).
        role: ``"teacher"``, a student name, or None.
    """

    maps: Tensor
    method: str
    layer: str | None = None
    role: str | None = None

    def __post_init__(self) -> None:
        check_maps(self.maps)


def check_maps(maps: Tensor, image_hw: tuple[int, int] | None = None) -> None:
    """Assert the explanation contract: float32, (N, H, W), finite, optionally at ``image_hw``."""
    if maps.dtype != torch.float32:
        raise ValueError(f"explanation maps must be float32, got {maps.dtype}")
    if maps.ndim != 3:
        raise ValueError(f"explanation maps must have shape (N, H, W), got {tuple(maps.shape)}")
    if image_hw is not None and tuple(maps.shape[1:]) != tuple(image_hw):
        raise ValueError(f"explanation maps are {tuple(maps.shape[1:])}, expected input resolution {image_hw}")
    if not torch.isfinite(maps).all():
        raise ValueError("explanation maps contain NaN or inf")


def normalize_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each map to [0, 1] by its own min and max (a constant map becomes all zeros)."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)


def check_inputs(images: Tensor, targets: Tensor | None) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if targets is not None and (targets.ndim != 1 or targets.shape[0] != images.shape[0]):
        raise ValueError(f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}")


def coerce_params(cls: type, params: Any) -> Any:
    """``params`` as an instance of the ``Params`` dataclass ``cls`` (a mapping is validated)."""
    if params is None:
        params = cls()
    elif isinstance(params, Mapping):
        params = from_dict(cls, params, "params")
    validate = getattr(params, "validate", None)
    if callable(validate):
        validate()
    return params


class Explainer:
    """Base class of registered explainers.

    Subclasses set ``Params`` (a dataclass of their options, validated from config) and implement
    :meth:`explain`. Construct with ``Explainer(model, **params)``; use as a context manager so
    hooks are released.
    """

    Params: ClassVar[type] = type("NoParams", (), {"__dataclass_fields__": {}})
    registry_name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, params: Any = None) -> None:
        self.model = model
        self.params = coerce_params(self.Params, params)

    def explain(self, images: Tensor, targets: Tensor | None) -> Attribution:
        """Maps for ``images`` (N, C, H, W) explaining class ``targets`` (N,) (None: the predicted class)."""
        raise NotImplementedError

    def __call__(self, images: Tensor, targets: Tensor | None) -> Attribution:
        return self.explain(images, targets)

    def close(self) -> None:
        """Release hooks and cached tensors."""

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def explainer_params(name: str, params: dict[str, Any] | None, path: str = "params") -> Any:
    """Validate ``params`` against explainer ``name``'s ``Params`` dataclass."""
    import xkd.explain  # noqa: F401  (registers explainers)

    cls = EXPLAINERS.get(name)
    return from_dict(cls.Params, params or {}, path)


def build_explainer(name: str, model: nn.Module, params: dict[str, Any] | None = None) -> Explainer:
    """Build registered explainer ``name`` for ``model`` with validated ``params``."""
    return EXPLAINERS.get(name)(model, explainer_params(name, params))
