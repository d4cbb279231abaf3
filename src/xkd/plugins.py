"""A config's ``plugins``: the user's Python modules, imported before the config's names are checked,
so the models, datasets, distillers, explainers and metrics they register can be named in it.

A leaf of the package (it imports only :mod:`xkd.errors`). A module is looked up on ``sys.path``,
to which the current folder is added (the ``xkd`` command does not have it, ``python`` does).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from xkd.errors import ConfigError


def import_plugins(modules: Sequence[str], key: str = "plugins") -> None:
    """Import each module of ``modules`` once (a module already imported is not imported again).

    Raises:
        ConfigError: a module that cannot be found or fails while importing, named with the
            exception it raised; or one whose name another module takes first (a ``code.py`` in the
            current folder loses to the standard library's ``code``).
    """
    for i, name in enumerate(modules):
        if not name or name.endswith(".py") or "/" in name or os.sep in name:
            raise ConfigError(
                f"{key}[{i}]: {name!r} is not a module name; give the module's import name (e.g. 'myplugins' "
                "for myplugins.py, found on PYTHONPATH or in the current folder)"
            )
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.append(cwd)
        module = sys.modules.get(name) or _import(name, f"{key}[{i}]")
        local = Path(cwd, *name.split(".")).with_suffix(".py")
        found = getattr(module, "__file__", None)
        if local.is_file() and (found is None or Path(found).resolve() != local.resolve()):
            raise ConfigError(
                f"{key}[{i}]: {name!r} is {found or 'a built-in module'}, not {local}: another module of that name "
                "comes first on sys.path (the standard library's?); rename your file"
            )


def _import(name: str, where: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(
                f"{where}: no module named {name!r}; put {name.replace('.', '/')}.py in the current folder "
                "or on PYTHONPATH (or install its package)"
            ) from None
        raise ConfigError(f"{where}: importing {name!r} failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # the user's module failed: say which, keep its traceback chained
        raise ConfigError(f"{where}: importing {name!r} failed: {type(e).__name__}: {e}") from e
