"""Metric metadata and results.

Every metric is registered in :data:`xkd.registry.METRICS` with a :class:`MetricInfo` saying whether
higher is better and what it needs, and produces :class:`MetricResult` values that are stored as
records. Metrics are plain functions of tensors; the pipeline decides what to feed them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xkd.registry import METRICS


@dataclass(frozen=True)
class MetricInfo:
    """Metadata of a registered metric.

    Attributes:
        name: registry name.
        higher_is_better: direction of the score (None when it has none, e.g. a confusion matrix).
        needs: inputs beyond predictions, e.g. ``("labels",)``, ``("maps", "masks")``,
            ``("second_model",)``.
        category: ``classification``, ``agreement``, ``cost``, ``faithfulness``, ``localisation``,
            ``sanity``, ``transfer``.
        fn: the function computing it.
        description: one line for the report.
    """

    name: str
    higher_is_better: bool | None
    needs: tuple[str, ...]
    category: str
    fn: Callable[..., Any]
    description: str = ""


@dataclass
class MetricResult:
    name: str
    value: Any
    higher_is_better: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)


def metric(
    name: str,
    *,
    higher_is_better: bool | None,
    needs: tuple[str, ...] = (),
    category: str,
    description: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a metric function with its metadata (one decorator, one place)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        info = MetricInfo(name, higher_is_better, needs, category, fn, description or (fn.__doc__ or "").split("\n")[0])
        METRICS.register(name)(info)
        fn.info = info  # type: ignore[attr-defined]
        return fn

    return deco
