"""xkd: explainable knowledge distillation.

Distil a teacher network into a small student, then show and measure what knowledge crossed over:
accuracy, agreement of the student's explanations with the teacher's, and the cost of running and
explaining each. The public API is re-exported here lazily (``xkd.build_dataset``, ``xkd.run``, ...).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy so that `import xkd` stays fast and the CLI's `--help` does not import torch. No API
    # function shares its name with a submodule (xkd.compare is the function, xkd.comparison its
    # module), so a submodule imported first cannot shadow one.
    if importlib.util.find_spec(f"xkd.{name}") is not None:  # `from xkd import <submodule>` inside the package
        return importlib.import_module(f"xkd.{name}")  # must not import the API (a circle while it loads)
    api = importlib.import_module("xkd.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'xkd' has no attribute {name!r}")
