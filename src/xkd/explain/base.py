"""The explainer contract.

An explainer maps ``(model, images, targets)`` to an :class:`Attribution`: float32 maps of shape
``(N, H, W)`` at input resolution, finite. Normalisation is a separate, explicit step
(:func:`normalize_maps`). Explainers are context managers: every hook they place is removed on exit.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xkd.errors import ConfigError, ContractError, NonFiniteAttributionError
from xkd.explain.superpixel import SuperpixelParams, slic_segments, superpixel_maps
from xkd.registry import EXPLAINERS
from xkd.schema import from_dict


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
        check_maps(self.maps, method=self.method)


def check_map_shape(
    maps: Tensor, image_hw: tuple[int, int] | None = None, n: int | None = None, method: str | None = None
) -> None:
    """The contract's dtype and shape (float32, ``(N, H, W)``, optionally ``n`` maps at ``image_hw``),
    from the tensor's metadata alone: it never waits for a device. Raises :class:`~xkd.errors.ContractError` naming ``method``."""
    who = f"explainer {method!r}" if method else "an explainer"
    contract = "an explainer returns float32 maps (N, H, W) at the images' resolution, one per image"
    if maps.dtype != torch.float32:
        raise ContractError(f"{who} returned {maps.dtype} maps; {contract}")
    if maps.ndim != 3:
        raise ContractError(f"{who} returned maps of shape {tuple(maps.shape)}; {contract}")
    if image_hw is not None and tuple(maps.shape[1:]) != tuple(image_hw):
        raise ContractError(f"{who} returned {tuple(maps.shape[1:])} maps for {tuple(image_hw)} images; {contract}")
    if n is not None and maps.shape[0] != n:
        raise ContractError(f"{who} returned {maps.shape[0]} maps for {n} images; {contract}")


def check_maps(maps: Tensor, image_hw: tuple[int, int] | None = None, method: str | None = None) -> None:
    """Assert the explanation contract: float32, (N, H, W), finite, optionally at ``image_hw``.

    Raises:
        NonFiniteAttributionError: naming ``method`` and the indices of the images with NaN/inf.
    """
    check_map_shape(maps, image_hw, method=method)
    who = f"explainer {method!r}" if method else "an explainer"
    bad = ~torch.isfinite(maps.flatten(1)).all(dim=1)
    if bad.any():
        idx = torch.nonzero(bad).flatten().tolist()
        shown = ", ".join(map(str, idx[:10])) + (f" and {len(idx) - 10} more" if len(idx) > 10 else "")
        raise NonFiniteAttributionError(
            f"{who} produced NaN or inf attributions for image index {shown} of the batch; check the model's "
            "outputs on those images (NaN logits) and the explainer's baseline and parameters",
            idx,
        )


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

    Subclasses set ``Params`` (a dataclass of their options, validated from config; its
    ``validate()`` may raise :class:`~xkd.errors.ConfigError`) and implement :meth:`explain`, which
    returns an :class:`Attribution` of float32 maps ``(N, H, W)`` at the images' resolution, one per
    image. Construct with ``Explainer(model, params)`` (a ``Params`` or a mapping); use as a context
    manager so hooks are released (:meth:`close`). A method that reads a layer takes it as a
    ``layer: str | None`` param and resolves it in ``__init__`` with :func:`xkd.models.hooks.get_module`
    (None: :func:`xkd.models.hooks.default_layer`, the model's declared or last conv layer): the run's
    preflight reports a wrong name, with the model's module paths, before anything trains.
    """

    Params: ClassVar[type] = type("NoParams", (), {"__dataclass_fields__": {}})
    registry_name: ClassVar[str] = ""
    #: ``"pixel"``: a value per pixel (superpixel metrics sum them per superpixel); ``"superpixel"``:
    #: every pixel holds its SLIC superpixel's value (KernelSHAP, LIME, ``+superpixel``), so the
    #: superpixel metrics read the value once instead of summing it over the superpixel's area.
    map_form: ClassVar[str] = "pixel"
    #: fewest images one call can explain (UniCAM's statistic is over a batch: 4)
    min_images: ClassVar[int] = 1
    #: optional packages the explainer imports, as ``(module, pip extra)`` pairs: a config naming the
    #: explainer fails before any training when one is missing (:func:`resolve_explainer`)
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()

    @classmethod
    def missing_packages(cls) -> list[tuple[str, str]]:
        """The ``(module, pip extra)`` pairs of :attr:`requires` that are not installed."""
        return [(m, extra) for m, extra in cls.requires if importlib.util.find_spec(m) is None]

    def __init__(self, model: nn.Module, params: Any = None) -> None:
        self.model = model
        self.params = coerce_params(self.Params, params)

    @classmethod
    def applies_to(cls, model: nn.Module) -> bool:
        """Whether this explainer can explain ``model`` at all (e.g. MED-TEX's Θ exists only for
        MED-TEX students); an evaluation skips the models it does not apply to."""
        return True

    def explain(self, images: Tensor, targets: Tensor | None) -> Attribution:
        """Maps for ``images`` (N, C, H, W) explaining class ``targets`` (N,) (None: the predicted class)."""
        raise NotImplementedError

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        """Raise :class:`~xkd.errors.ConfigError` when images of ``shape`` ``(C, H, W)`` cannot be explained
        with these params (a run checks this before anything trains); the default accepts every shape."""

    def __call__(self, images: Tensor, targets: Tensor | None) -> Attribution:
        return self.explain(images, targets)

    def close(self) -> None:
        """Release hooks and cached tensors."""

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SUPERPIXEL_SUFFIX = "+superpixel"


def split_name(name: str) -> tuple[str, bool]:
    """``"grad_cam+superpixel"`` -> ``("grad_cam", True)``; a plain name -> ``(name, False)``."""
    if name.endswith(SUPERPIXEL_SUFFIX):
        return name[: -len(SUPERPIXEL_SUFFIX)], True
    return name, False


EXPLAINERS.expects(
    lambda obj: isinstance(obj, type) and issubclass(obj, Explainer),
    "register a subclass of xkd.explain.Explainer (with an explain(images, targets) method)",
)


@dataclass(frozen=True)
class ExplainerSpec:
    """One explainer resolved once from its configured name and parameters: the registered class,
    the validated ``Params``, and what the evaluation needs to know of it. Build explainers from the
    spec (:meth:`build`); nothing downstream looks the name up again.

    Attributes:
        key: the label it is recorded and shown under (the configured ``label``, else ``name``).
        name: the configured name, with ``+superpixel`` for the superpixel form.
        cls: the registered explainer class (the inner one for the superpixel form).
        params: the validated parameters (:class:`SuperpixelFormParams` for the superpixel form).
        superpixel: whether this is the superpixel form of ``cls``.
    """

    key: str
    name: str
    cls: type
    params: Any
    superpixel: bool = False

    @property
    def base(self) -> str:
        """The registered name without ``+superpixel``."""
        return split_name(self.name)[0]

    @property
    def min_images(self) -> int:
        """The fewest images one call can explain (UniCAM's statistic is over a batch: 4)."""
        return int(self.cls.min_images)

    @property
    def map_form(self) -> str:
        """``"superpixel"`` if the maps hold one value per superpixel, else ``"pixel"``."""
        return "superpixel" if self.superpixel else self.cls.map_form

    @property
    def pair(self) -> bool:
        """True for explainers of a (student, teacher) pair (UniCAM): they explain students only."""
        return bool(getattr(self.cls, "needs_teacher", False))

    @property
    def needs_base(self) -> bool:
        """True for maps of a student against a base model of its architecture trained without the
        teacher (UniCAM's ``kd_given_base`` and ``base_given_kd``): the run passes ``base=``."""
        needs = getattr(self.cls, "needs_base", None)
        return bool(needs(self.params)) if callable(needs) else False

    def applies(self, model: nn.Module) -> bool:
        """Whether this explainer can explain ``model`` at all."""
        return self.cls.applies_to(model)

    def build(self, model: nn.Module, **context: Any) -> Explainer:
        """The explainer for ``model``; ``context`` passes objects some explainers need (``teacher=``
        for UniCAM); explainers that do not take them ignore them."""
        if self.superpixel:
            return SuperpixelForm(model, self.params, inner=self.base, **context)
        return _construct(self.cls, model, self.params, context)


def resolve_explainer(
    name: str, params: dict[str, Any] | None = None, label: str | None = None, path: str = "params"
) -> ExplainerSpec:
    """Resolve registered explainer ``name`` (``+superpixel`` allowed) and validate ``params``
    against its ``Params`` dataclass; for the superpixel form the SLIC options are the
    ``superpixel`` entry of ``params``. Errors name ``path``."""
    base, superpixel = split_name(name)
    cls = EXPLAINERS.get(base)
    missing = cls.missing_packages()
    if missing:
        module, extra = missing[0]
        raise ConfigError(
            f"explainer {base!r} needs the optional package {module!r}, which is not installed: "
            f"pip install 'xkd[{extra}]', or leave {base!r} out of the explainers"
        )
    params = dict(params or {})
    sp = params.pop("superpixel", None) if superpixel else None
    inner = from_dict(cls.Params, params, path)
    validate = getattr(inner, "validate", None)
    if callable(validate):
        validate()
    if superpixel:
        sp_params = from_dict(SuperpixelParams, sp or {}, f"{path}.superpixel")
        sp_params.validate()
        inner = SuperpixelFormParams(inner, sp_params)
    return ExplainerSpec(label or name, name, cls, inner, superpixel)


def explainer_params(name: str, params: dict[str, Any] | None, path: str = "params") -> Any:
    """The validated parameters of explainer ``name`` (see :func:`resolve_explainer`)."""
    return resolve_explainer(name, params, path=path).params


def map_form(name: str) -> str:
    """``"superpixel"`` if explainer ``name``'s maps hold one value per superpixel, else ``"pixel"``."""
    return resolve_explainer(name).map_form


def build_explainer(name: str, model: nn.Module, params: dict[str, Any] | None = None, **context: Any) -> Explainer:
    """Build registered explainer ``name`` (optionally ``name+superpixel``) for ``model`` with
    validated ``params``. ``context`` passes extra objects some explainers need (``teacher=`` for
    ``unicam``); explainers that do not take them ignore them."""
    return resolve_explainer(name, params).build(model, **context)


def _construct(cls: type, model: nn.Module, params: Any, context: dict[str, Any]) -> Explainer:
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in context.items() if takes_any or k in accepted}
    return cls(model, params, **kwargs)


@dataclass
class SuperpixelFormParams:
    """Validated options of :class:`SuperpixelForm`: the inner explainer's and SLIC's."""

    inner: Any
    superpixel: Any


class SuperpixelForm(Explainer):
    """The XDistillation superpixel form of any explainer (Alharbi et al. 2021, §III-A1): the inner explainer's pixel
    map, then every pixel takes the **sum** of the attributions in its SLIC superpixel
    (:func:`xkd.explain.superpixel.superpixel_maps`). Registered explainers get it by name:
    ``"<name>+superpixel"``. An inner explainer already in superpixel form (KernelSHAP, LIME) gives
    the **mean** of its superpixel instead: its pixels each hold the whole superpixel's value."""

    map_form = "superpixel"

    def __init__(self, model: nn.Module, params: SuperpixelFormParams, *, inner: str, **context: Any) -> None:
        self.model = model
        self.params = params
        self.registry_name = inner + SUPERPIXEL_SUFFIX
        self.inner = _construct(EXPLAINERS.get(inner), model, params.inner, context)

    def explain(self, images: Tensor, targets: Tensor | None) -> Attribution:
        a = self.inner.explain(images, targets)
        check_map_shape(a.maps, tuple(images.shape[-2:]), images.shape[0], method=self.inner.registry_name)
        segments = slic_segments(images, self.params.superpixel).to(a.maps.device)
        reduce = "mean" if self.inner.map_form == "superpixel" else "sum"
        maps = superpixel_maps(a.maps, segments, reduce=reduce)
        return Attribution(maps, method=self.registry_name, layer=a.layer, role=a.role)

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        self.inner.check_image_shape(shape)

    def close(self) -> None:
        self.inner.close()
