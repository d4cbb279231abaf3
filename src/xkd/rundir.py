"""The run directory: one object owns its layout, so no other module spells its file names.

```
runs/<name>/
  config.yaml            the resolved config
  metrics.json           headline numbers per model
  records/<kind>.json    frozen, versioned records (run, models, explanations, samples, compare, study)
  records/samples.safetensors
  figures/               report figures
  checkpoints/<role>/{best,last}.pt and best.train.json (how long the weights took to train)
  tensorboard/<role>/    TensorBoard event files per model; tensorboard/_run/: explanations, hparams
  seeds/seed_<s>/        one run directory per seed (xkd compare)
  report.html
```

A comparison and a study use the same layout for their own records and report. The teacher cache
(``<output_dir>/.cache`` unless ``cache_dir`` is set) lives outside any run directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from xkd.config import RunConfig, save_config
from xkd.errors import RunExistsError
from xkd.files import atomic_write_bytes, load_yaml, read_json, record, write_json
from xkd.schema import from_dict

log = logging.getLogger("xkd")

BEST, LAST = "best.pt", "last.pt"
"""Checkpoint file names inside a model's checkpoint folder."""


class RunDir:
    """The folder of one run (or comparison, or study) and every path inside it."""

    CONFIG = "config.yaml"
    METRICS = "metrics.json"
    REPORT = "report.html"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, cfg: RunConfig) -> RunDir:
        """``<output_dir>/<name>`` of ``cfg``."""
        return cls(Path(cfg.output_dir) / cfg.name)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- paths -----------------------------------------------------------------------------------
    @property
    def records(self) -> Path:
        return self.path / "records"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def report(self) -> Path:
        return self.path / self.REPORT

    @property
    def samples_tensors(self) -> Path:
        return self.records / "samples.safetensors"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files of the run (``tensorboard --logdir`` this or a parent)."""
        return self.path / "tensorboard"

    def tensorboard_dir(self, role: str | None = None) -> Path:
        """``tensorboard/<role>/``: one TensorBoard run per model; ``tensorboard/_run/`` (``role``
        None): the run's explanation grids and its hyper-parameters with the final metrics."""
        return self.tensorboard / ("_run" if role is None else role.replace("/", "_"))

    @property
    def seeds(self) -> Path:
        """Where ``xkd compare`` puts one run directory per seed."""
        return self.path / "seeds"

    def record(self, kind: str) -> Path:
        """``records/<kind>.json``."""
        return self.records / f"{kind}.json"

    def has_record(self, kind: str) -> bool:
        return self.record(kind).is_file()

    def checkpoint_dir(self, role: str) -> Path:
        return self.checkpoints / role

    def checkpoint(self, role: str, which: str = BEST) -> Path:
        """``checkpoints/<role>/best.pt`` (or ``last.pt``)."""
        return self.checkpoint_dir(role) / which

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory, as records name files."""
        return path.relative_to(self.path).as_posix()

    # -- state -----------------------------------------------------------------------------------
    def is_run(self) -> bool:
        """Whether the folder holds an xkd run (or comparison, or study): it has its config."""
        return self.config.is_file()

    def is_finished(self) -> bool:
        """Whether a run finished: its headline numbers and model records are written."""
        return self.metrics.is_file() and self.has_record("models")

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def check(self, resume: bool, overwrite: bool) -> None:
        """Raise :class:`RunExistsError` when the folder cannot be used as asked; writes nothing."""
        if self.is_empty():
            return
        if overwrite:
            if not self.is_run():
                raise RunExistsError(f"{self.path} is not empty and is not an xkd run directory; refusing to delete it")
        elif not resume:
            raise RunExistsError(
                f"run directory {self.path} already exists; pass --resume to continue it, --overwrite to start "
                "over, or choose another name (--set name=NEW)"
            )

    def clear(self) -> None:
        """Delete the folder (only after :meth:`check` allowed ``overwrite``)."""
        if not self.is_empty():
            shutil.rmtree(self.path)

    def create(self, cfg: RunConfig) -> None:
        """Make the sub-folders and write the resolved config."""
        for sub in (self.records, self.figures, self.checkpoints):
            sub.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config)

    # -- records ---------------------------------------------------------------------------------
    def write_record(self, kind: str, payload: dict[str, Any]) -> Path:
        """Write ``records/<kind>.json`` atomically, with the schema version and kind."""
        return write_json(self.record(kind), record(kind, payload))

    def read_record(self, kind: str) -> Any:
        return read_json(self.record(kind))

    def write_metrics(self, payload: dict[str, Any]) -> Path:
        return write_json(self.metrics, record("metrics", payload))

    def read_config(self) -> RunConfig:
        """The config the run was written with."""
        return from_dict(RunConfig, load_yaml(self.config.read_text()))


def cache_root(cfg: RunConfig) -> Path:
    """The cache shared by the runs of ``cfg.output_dir``: trained teachers, distillers' artefacts."""
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / ".cache"


def mlflow_root(cfg: RunConfig) -> Path:
    """The local MLflow store of ``cfg.output_dir`` when ``tracking.uri`` is unset:
    ``<output_dir>/mlruns/mlflow.db`` (SQLite) and ``<output_dir>/mlruns/artifacts/``."""
    return Path(cfg.output_dir) / "mlruns"


# -- training-time sidecars of checkpoints ---------------------------------------------------------


def train_info_path(checkpoint: Path) -> Path:
    """Where the record of how a checkpoint was trained lives: ``best.pt`` -> ``best.train.json``."""
    return checkpoint.with_name(f"{checkpoint.stem}.train.json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_train_info(checkpoint: Path, info: dict[str, Any]) -> None:
    """Store ``info`` (training seconds, best epoch) next to ``checkpoint``, with the checkpoint's
    SHA-256 so a record is never applied to other weights."""
    data = dict(info, checkpoint_sha256=sha256_file(checkpoint))
    atomic_write_bytes(train_info_path(checkpoint), json.dumps(data, indent=1).encode())


def read_train_info(checkpoint: Path) -> dict[str, Any] | None:
    """The record :func:`write_train_info` stored for ``checkpoint``; None when it is missing,
    unreadable or written for other weights (a checkpoint trained before records existed)."""
    path = train_info_path(checkpoint)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("cannot read %s; the training time of %s is unknown", path, checkpoint)
        return None
    if not isinstance(info, dict) or info.get("checkpoint_sha256") != sha256_file(checkpoint):
        log.warning("%s does not describe %s (other weights); the training time is unknown", path, checkpoint)
        return None
    return info
