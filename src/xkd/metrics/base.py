"""Metric metadata: every metric is declared once, where it is defined.

A metric is a plain function of tensors registered with :func:`metric`. Its registration says what
it needs (inputs from one fixed vocabulary, :data:`INPUTS`), where it applies (its :data:`scope`),
whether higher is better, how it is shown (columns with a label), how its result is recorded, and
whether a run computes it by default. The scoring loop (:mod:`xkd.scoring`) gathers the declared
inputs and calls it; the report's columns, ``xkd compare``'s tables and the default metric list are
all read from these declarations, which are also saved with the records (:func:`metric_info`) so
``xkd report`` renders a run as it was scored.

Adding a metric is one decorated function (and its test)::

    @metric("mask_iou", scope="model", inputs=("maps", "masks"), higher_is_better=True,
            category="localisation", label="Mask IoU")
    def mask_iou(maps, masks): ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from xkd.errors import ContractError, RegistryError
from xkd.registry import METRICS

Scope = Literal["model", "agreement", "transfer", "timing", "test", "study"]
SCOPES: dict[str, str] = {
    "model": "one model's maps of one explainer (faithfulness, localisation, sanity)",
    "agreement": "a student's maps against the teacher's maps of the same explainer (and an independent student's)",
    "transfer": "a student's features against the teacher's features (once per student)",
    "timing": "the cost of running one explainer on one model",
    "test": "predictions on the test split (every run computes these)",
    "study": "computed by a study (`xkd study`), not by a run",
}

INPUTS: dict[str, str] = {
    "model": "the explained model",
    "images": "the explained test images (N, C, H, W)",
    "labels": "their true classes, the class every map explains",
    "maps": "the model's maps of one explainer (N, H, W), explaining each image's true class",
    "prediction_maps": "the model's maps of one explainer explaining each image's predicted class",
    "masks": "ground-truth masks (N, H, W); metrics needing them are skipped on data without masks",
    "k_values": "MED-TEX's K values (pixel counts) for the image size",
    "class_names": "one name per class",
    "num_classes": "the number of classes",
    "explainer": "the explainer, built for the model (closed after the call)",
    "make_explainer": "a factory building the explainer for any model (sanity checks)",
    "random_label_model": "the student architecture trained on permuted labels (label sanity check)",
    "teacher_maps": "the teacher's maps of the explainer",
    "student_maps": "the student's maps of the explainer",
    "independent_maps": (
        "the maps of the explainer by the run's independent student (the student's architecture trained without "
        "the teacher: the `scratch` student unless the metric's `independent` parameter names another); absent "
        "for that student itself and for students of another architecture"
    ),
    "independent_role": "the name of that independent student",
    "segments": "SLIC superpixels of the images",
    "both_correct": "images both teacher and student classify correctly",
    "same_prediction": "images teacher and student assign the same class",
    "map_form": "'pixel' or 'superpixel': how the explainer's maps hold superpixel values",
    "student_features": "the student's features at its matched layer",
    "teacher_features": "the teacher's features at its matched layer",
    "predictions": "a model's predicted classes on the test split",
    "teacher_predictions": "the teacher's predicted classes on the test split",
    "logits": "a model's logits on the test split",
    "image_shape": "(C, H, W) of the data",
    "concept_data": "images with concept masks (network dissection)",
    "batch_size": "evaluation.batch_size",
    "fidelity_keep": "evaluation.fidelity_keep",
    "agreement_top_k": "evaluation.agreement_top_k",
}
"""The fixed vocabulary of what a metric may ask the scoring loop for."""


@dataclass(frozen=True)
class Column:
    """One number a metric shows in the report and in ``xkd compare``.

    Attributes:
        key: its entry in the explainer's record.
        label: the column's head.
        title: what it means, one line.
        sub: for a record entry that is a dict, the key of the number inside it.
        higher_is_better: its direction (None: the metric's).
    """

    key: str
    label: str
    title: str = ""
    sub: str | None = None
    higher_is_better: bool | None = None

    def value(self, entry: dict[str, Any]) -> Any:
        v = entry.get(self.key)
        if self.sub is not None:
            return v.get(self.sub) if isinstance(v, dict) else None
        return v


@dataclass(frozen=True)
class MetricInfo:
    """The declaration of a registered metric.

    Attributes:
        name: registry name; a run's ``evaluation.metrics`` lists these.
        fn: the function computing it.
        scope: where it applies (:data:`SCOPES`).
        inputs: what the scoring loop passes, from :data:`INPUTS`: ``"maps"`` passes the maps as the
            next positional argument, ``"targets=labels"`` passes the labels as ``targets=``.
        higher_is_better: direction of the headline (None when it has none, e.g. a confusion matrix).
        label: display name.
        category: family shown by ``xkd list``: ``classification``, ``agreement``, ``cost``,
            ``faithfulness``, ``localisation``, ``sanity``, ``transfer``, ``interpretability``.
        description: one line for the report.
        default: whether a run computes it when ``evaluation.metrics`` is not given.
        kwargs: fixed keyword arguments the run passes (``evaluation.metric_params`` override them).
        subset: an ``evaluation`` count (``sanity_images``, ``met_images``): the metric sees only the
            first that many images (skipped when it is 0).
        record: turns the function's return value into the entries of the record (default: the
            headline under the metric's name).
        chance: whether the run also scores seeded random maps with it (the chance level).
        chance_record: like ``record``, for the chance level (default: the headline).
        columns: the numbers shown per explainer (default: one, the headline under its name).
        sentence: for a share of images tested against chance, a plain sentence per student and
            explainer, a ``str.format`` template the report fills with preformatted text:
            ``{explainer}`` (its display name), ``{share}`` (the record's ``share`` as a percentage;
            in ``xkd compare`` the mean ± std over seeds), ``{images}``, ``{p}`` (``p = ...`` of the
            record's ``p_value``; in ``xkd compare`` the p-value of every seed) and any other text
            entry of the record (e.g. ``{independent}``).
        min_side: the smallest image height and width it can score (a run checks it before training).
        min_images: the fewest images it can score (a statistic over a sample; checked likewise).
        check: raises ``ValueError`` for arguments the function would refuse; it takes some of the
            function's keyword arguments, by name (a run checks ``evaluation.metric_params`` with it
            before training, see :meth:`check_params`).
    """

    name: str
    fn: Callable[..., Any]
    scope: str
    inputs: tuple[str, ...]
    higher_is_better: bool | None
    label: str
    category: str
    description: str = ""
    default: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    subset: str | None = None
    record: Callable[[Any], dict[str, Any]] | None = None
    chance: bool = False
    chance_record: Callable[[Any], dict[str, Any]] | None = None
    columns: tuple[Column, ...] = ()
    sentence: str | None = None
    min_side: int = 1
    min_images: int = 1
    check: Callable[..., None] | None = None

    @property
    def needs(self) -> tuple[str, ...]:
        """The vocabulary inputs it needs, in order."""
        return tuple(i.split("=", 1)[-1] for i in self.inputs)

    @property
    def filled(self) -> dict[str, str]:
        """The function's arguments the scoring loop passes, each with the vocabulary input it gets;
        not ``independent_role``, which a run's ``evaluation.metric_params`` may choose."""
        names = list(inspect.signature(self.fn).parameters)
        positional = [i for i in self.inputs if "=" not in i]
        out = dict(zip(names, positional, strict=False))
        out.update(i.split("=", 1) for i in self.inputs if "=" in i)
        return {k: v for k, v in out.items() if v != "independent_role"}

    def check_params(self, params: dict[str, Any]) -> None:
        """Raise ``ValueError`` when the function would refuse these keyword arguments (``params``
        over the declaration's ``kwargs`` and the function's defaults)."""
        if self.check is None:
            return
        sig = inspect.signature(self.fn).parameters
        values = {n: p.default for n, p in sig.items() if p.default is not inspect.Parameter.empty}
        values |= self.kwargs | params
        wanted = inspect.signature(self.check).parameters
        self.check(**{n: values[n] for n in wanted if n in values})

    def bind(self, values: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Positional and keyword arguments from the gathered input ``values``."""
        args, kwargs = [], dict(self.kwargs)
        for i in self.inputs:
            if "=" in i:
                param, name = i.split("=", 1)
                kwargs[param] = values[name]
            else:
                args.append(values[i])
        return args, kwargs

    def to_record(self, value: Any, chance: bool = False) -> dict[str, Any]:
        """The record entries of the function's return ``value``."""
        fn = self.chance_record if chance else self.record
        if fn is not None:
            return fn(value)
        # a user's metric whose headline was lost: it was recorded as null
        if isinstance(value, Mapping) and self.name not in value:
            raise ContractError(
                f"metric {self.name!r} returned a dict without its headline under {self.name!r} (keys: "
                f"{', '.join(map(str, value))}); put the headline number there, or declare record= in @metric"
            )
        return {self.name: headline(value, self.name)}  # several values (reduction: none) stay a list

    def info(self) -> dict[str, Any]:
        """The declaration as plain data, saved with the records."""
        return {
            "higher_is_better": self.higher_is_better,
            "category": self.category,
            "description": self.description,
            "scope": self.scope,
            "label": self.label,
            "sentence": self.sentence,
            "columns": [
                {
                    "key": c.key,
                    "label": c.label,
                    "title": c.title,
                    "sub": c.sub,
                    "higher_is_better": self.higher_is_better if c.higher_is_better is None else c.higher_is_better,
                }
                for c in self.columns
            ],
        }


@dataclass
class MetricResult:
    name: str
    value: Any
    higher_is_better: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)


def headline(value: Any, name: str | None = None) -> Any:
    """The headline number of a metric's return value: the entry under its name for a dict, a plain
    number for a one-element tensor, a list for a larger one."""
    if isinstance(value, dict) and name is not None:
        value = value.get(name)
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    return value


def metric(
    name: str,
    *,
    scope: Scope,
    inputs: tuple[str, ...] = (),
    higher_is_better: bool | None,
    category: str,
    label: str | None = None,
    description: str = "",
    default: bool = False,
    kwargs: dict[str, Any] | None = None,
    subset: str | None = None,
    record: Callable[[Any], dict[str, Any]] | None = None,
    chance: bool = False,
    chance_record: Callable[[Any], dict[str, Any]] | None = None,
    columns: tuple[Column, ...] | None = None,
    sentence: str | None = None,
    min_side: int = 1,
    min_images: int = 1,
    check: Callable[..., None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a metric function with its declaration (one decorator, one place)."""
    if scope not in SCOPES:
        raise ValueError(f"metric {name!r}: unknown scope {scope!r}; scopes: {', '.join(SCOPES)}")
    unknown = [i for i in inputs if i.split("=", 1)[-1] not in INPUTS]
    if unknown:
        raise ValueError(f"metric {name!r}: unknown input(s) {unknown}; the vocabulary: {', '.join(INPUTS)}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        try:  # an input "x" is passed by position, in the order declared; "param=x" by keyword
            positional = [i for i in inputs if "=" not in i]
            inspect.signature(fn).bind_partial(*positional, **{i.split("=", 1)[0]: i for i in inputs if "=" in i})
        except TypeError as e:
            raise RegistryError(
                f"metric {name!r}: declares inputs {tuple(inputs)} but {fn.__name__}() cannot take them ({e}); "
                "make the function's parameters match the declared inputs"
            ) from None
        desc = description or (fn.__doc__ or "").split("\n")[0]
        shown = label or name.replace("_", " ").capitalize()
        cols = columns if columns is not None else (Column(name, shown, desc),)
        info = MetricInfo(
            name, fn, scope, tuple(inputs), higher_is_better, shown, category, desc, default,
            dict(kwargs or {}), subset, record, chance, chance_record, cols, sentence, min_side, min_images, check,
        )  # fmt: skip
        METRICS.register(name)(info)
        fn.info = info  # type: ignore[attr-defined]
        return fn

    return deco


METRICS.expects(
    lambda obj: isinstance(obj, MetricInfo),
    "decorate the function with xkd.metrics.metric(name, scope=..., ...) instead of registering it",
)


def declared(*scopes: str) -> Iterator[MetricInfo]:
    """Registered metrics of the given scopes, in registration order (the order a run computes them)."""
    for info in METRICS.entries():
        if not scopes or info.scope in scopes:
            yield info


def default_metrics() -> list[str]:
    """The metrics a run computes when ``evaluation.metrics`` is not given, scope by scope."""
    return [m.name for scope in ("model", "agreement", "transfer", "timing") for m in declared(scope) if m.default]


def metric_info(names: list[str]) -> dict[str, Any]:
    """The declarations of ``names`` as plain data, for the records."""
    return {n: METRICS.get(n).info() for n in names}
