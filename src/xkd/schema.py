"""Plain data <-> typed dataclasses: :func:`from_dict` builds a dataclass from YAML/JSON data with
errors that name the key path and the allowed values, :func:`to_dict` gives the plain form back.

A leaf of the package (it imports only :mod:`xkd.errors`): the run config, every method's parameter
dataclass and the records use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

from xkd.errors import ConfigError, RegistryError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: a value is required ({_type_name(tp)})")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _concrete(tp: Any) -> Any:
    """``tp`` with abstract sequences (``Sequence[float]``, as functions annotate their arguments)
    read as lists, the form a config gives them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Sequence:
        return list[_concrete(args[0])] if args else list
    if origin in (Union, types.UnionType):
        return Union[tuple(_concrete(a) for a in args)]  # noqa: UP007  (built from a tuple)
    return tp


def check_value(tp: Any, value: Any, path: str) -> None:
    """Check ``value`` against the annotation ``tp`` as a config field is checked (one
    :class:`ConfigError` naming ``path``). A type a config cannot hold (a tensor, a module) is not
    checked here: the function that receives the value checks it."""
    try:
        _convert(_concrete(tp), value, path)
    except TypeError:
        pass


def _class_var(tp: Any) -> bool:
    """Whether an annotation (a string under ``from __future__ import annotations``) is a ``ClassVar``."""
    if isinstance(tp, str):
        return tp.startswith(("ClassVar", "typing.ClassVar"))
    return tp is typing.ClassVar or typing.get_origin(tp) is typing.ClassVar


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Raises:
        ConfigError: naming the key path, the problem and the allowed keys or values.
    """
    where = path or "config"
    # a subclass of a dataclass without the decorator is one too, but without its own fields (they
    # were silently the parent's defaults)
    own = [k for k, tp in cls.__dict__.get("__annotations__", {}).items() if not _class_var(tp)]
    if not dataclasses.is_dataclass(cls) or (own and "__dataclass_fields__" not in cls.__dict__):
        raise RegistryError(f"{where}: {cls.__name__} is not a dataclass; decorate it with @dataclasses.dataclass")
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        allowed = f"allowed keys here: {', '.join(fields)}" if fields else f"{where} takes no keys: remove it"
        raise ConfigError(f"unknown key {key!r}; {allowed}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except (ConfigError, ValueError, AssertionError) as e:  # a user's validate may raise any of them
            raise ConfigError(f"{where}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML/JSON-able) form of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
