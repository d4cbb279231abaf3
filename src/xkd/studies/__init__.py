"""The studies of ``xkd study``: claims of the sources re-measured on the user's models and data.

- ``kd-vs-ls`` (:mod:`xkd.studies.kd_vs_ls`): KD vs label smoothing vs scratch (Han et al., ICML 2023).
- ``capacity-gap`` (:mod:`xkd.studies.capacity_gap`): teachers of growing size and a teacher assistant
  (UniCAM; Mirzadeh et al.).

Both are built on :func:`xkd.compare.compare` (multi-seed runs of one config) and write
``records/study.json`` and ``study.html`` next to it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

STUDIES = ("kd-vs-ls", "capacity-gap")


def study_runner(name: str) -> Callable[..., Path]:
    """The ``run_study`` function of study ``name``."""
    if name == "kd-vs-ls":
        from xkd.studies.kd_vs_ls import run_study
    elif name == "capacity-gap":
        from xkd.studies.capacity_gap import run_study
    else:
        from xkd.config import ConfigError

        raise ConfigError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return run_study


__all__: list[Any] = ["STUDIES", "study_runner"]
