"""The one registry type.

Every dataset, model, distiller, explainer and metric is registered once with a decorator (xkd's own
and a user's: a config's ``plugins`` imports the user's modules); the CLI, ``xkd list`` and config
validation take their choices from these registries.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from xkd.errors import RegistryError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of builders of one kind (datasets, models, ...).

    Example:
        >>> from torch import nn
        >>> MODELS = Registry("model")
        >>> @MODELS.register("tiny")
        ... def tiny(num_classes: int) -> nn.Module:
        ...     return nn.LazyLinear(num_classes)
        >>> MODELS.get("tiny")(10)
        LazyLinear(in_features=0, out_features=10, bias=True)
    """

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries: dict[str, T] = {}
        self._expects: tuple[Callable[[object], bool], str] | None = None

    def expects(self, accepts: Callable[[object], bool], how: str) -> None:
        """Entries must satisfy ``accepts``; ``how`` says how to register one (the error's fix)."""
        self._expects = (accepts, how)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``.

        A name is registered once; the same definition registered again (its module reloaded, a
        notebook cell run again, a script imported as ``__main__`` and as a plugin: the same module
        file and qualified name, see :func:`_origin`) replaces the earlier one."""

        def decorator(obj: T) -> T:
            if self._expects is not None and not self._expects[0](obj):
                raise RegistryError(f"{self.kind} {name!r}: {self._expects[1]}")
            held = self._entries.get(name)
            if held is not None and _origin(held) != _origin(obj):
                where, qualname = _origin(held)
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered ({qualname}, {where}); register yours under "
                    "another name"
                )
            self._entries[name] = obj
            if isinstance(obj, type) or callable(obj):
                try:
                    obj.registry_name = name  # type: ignore[attr-defined]
                except (AttributeError, TypeError):
                    pass
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the entry called ``name`` or raise :class:`UnknownNameError` listing the names."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered {self.plural}: {', '.join(self.names())}"
            ) from None

    def entries(self) -> list[T]:
        """The registered entries in registration order."""
        return list(self._entries.values())

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _origin(obj: object) -> tuple[str, str]:
    """Where ``obj`` was defined (of a metric declaration, its function): the file of its module and its
    qualified name, so a file imported twice (as ``__main__`` and as a plugin) is one definition; an
    object without a name of its own (a lambda, a partial, an instance) is only itself."""
    target = getattr(obj, "fn", obj)
    qualname = getattr(target, "__qualname__", None)
    if not isinstance(qualname, str) or "<lambda>" in qualname:
        return f"object at {id(target):#x}", type(target).__qualname__
    module = getattr(target, "__module__", None) or ""
    file = getattr(sys.modules.get(module), "__file__", None)
    return (str(Path(file).resolve()) if file else module), qualname


DATASETS: Registry = Registry("dataset")
MODELS: Registry = Registry("model")
DISTILLERS: Registry = Registry("distiller")
EXPLAINERS: Registry = Registry("explainer")
METRICS: Registry = Registry("metric")
STUDIES: Registry = Registry("study", "studies")

ALL_REGISTRIES: dict[str, Registry] = {
    "datasets": DATASETS,
    "models": MODELS,
    "distillers": DISTILLERS,
    "explainers": EXPLAINERS,
    "metrics": METRICS,
    "studies": STUDIES,
}
