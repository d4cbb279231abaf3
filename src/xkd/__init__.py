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


# API functions named like the submodule that defines them: ``xkd.compare`` is the function.
NAMED_LIKE_MODULES = ("compare", "explain_images", "sweep")


def __getattr__(name: str) -> Any:
    # Lazy so that `import xkd` stays fast and the CLI's `--help` does not import torch.
    if name not in NAMED_LIKE_MODULES and importlib.util.find_spec(f"xkd.{name}") is not None:
        return importlib.import_module(f"xkd.{name}")  # `from xkd import <submodule>` inside the package
    api = importlib.import_module("xkd.api")  # must not be imported for a submodule (a circle while it loads)
    # importing a submodule sets the package's attribute of its name to the module, so `xkd.sweep` was
    # the module and `xkd.sweep(...)` a TypeError; the functions replace them once the API is loaded
    globals().update({n: getattr(api, n) for n in NAMED_LIKE_MODULES})
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'xkd' has no attribute {name!r}")
