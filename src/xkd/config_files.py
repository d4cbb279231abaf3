"""Run config files: read a YAML config with ``--set`` overrides into a :class:`~xkd.config.RunConfig`
(types checked; registry names and method parameters by :func:`xkd.plan.load_config`) and write one
back. A leaf beside :mod:`xkd.config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from xkd.config import RunConfig
from xkd.errors import ConfigError
from xkd.files import atomic_write_text, load_yaml
from xkd.schema import from_dict, to_dict


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML. List items are
    addressed by index: ``students.1.params.alpha=0.5``."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.path=value")
    key, text = assignment.split("=", 1)
    try:
        value = load_yaml(text) if text != "" else ""
    except yaml.YAMLError as e:  # was a raw traceback
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML: {e}") from None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {key!r}: {'.'.join(parts[:i]) or 'config'} has {len(node)} items; "
                    f"index {part!r} is not one of 0..{len(node) - 1}"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def read_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config (or the defaults when ``path`` is None), apply ``--set`` overrides,
    and check its types. Registry names and method parameters are checked by
    :func:`xkd.plan.load_config`, which calls this."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    else:
        raw = to_dict(RunConfig())
    for o in overrides:
        apply_override(raw, o)
    return from_dict(RunConfig, raw)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
