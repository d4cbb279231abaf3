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

What a folder holds is told by what each command writes first (:meth:`RunDir.kind`): a comparison
its ``seeds/``, a capacity-gap or explanation-transfer study its ``teachers/`` or ``fractions/``, a
sweep its ``study.db`` (or ``trial-NNNN/``), a run its ``config.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from xkd.config import RunConfig
from xkd.config_files import save_config
from xkd.errors import RunExistsError, XkdError
from xkd.files import atomic_write_bytes, load_yaml, read_json, record, write_json
from xkd.schema import from_dict, to_dict

log = logging.getLogger("xkd")

BEST, LAST = "best.pt", "last.pt"
"""Checkpoint file names inside a model's checkpoint folder."""

STUDY_FOLDERS = ("teachers", "fractions")
"""The folders of a study's comparisons (capacity-gap, explanation-transfer): a study's own marker."""
SWEEP_DATABASE = "study.db"
"""A sweep's default Optuna storage in its folder (:class:`xkd.sweeps.outputs.SweepDir` owns that layout)."""
_HOW_A_STEP_RUNS = ("amp", "channels_last", "compile", "num_workers", "tensorboard", "optimizer.fused")
RUN_READS_NOT = (
    "compare", "study", "sweep", "tracking", "output_dir", "cache_dir",
    *(f"{t}.{k}" for t in ("train", "teacher.train") for k in _HOW_A_STEP_RUNS),
)  # fmt: skip
"""Config paths that change nothing a finished run computed: the sections a run never reads
(``xkd compare``, ``xkd study`` and ``xkd sweep`` read them, e.g. ``compare.seeds``), where it logs
and stores, and how a training step runs rather than what it computes (precision, layout, compile,
workers, TensorBoard, the fused optimiser: :func:`xkd.plan.resume_conflicts` ignores them too)."""
RUN_RECORDS = ("run", "models", "explanations", "samples")
"""The records of a finished run (``metrics.json`` is written after them), all its report reads."""
COMMANDS = {"run": "xkd run", "comparison": "xkd compare", "study": "xkd study", "sweep": "xkd sweep"}
"""The command that writes (and resumes) each kind of folder :meth:`RunDir.kind` tells apart."""


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
    def kind(self) -> str | None:
        """What the folder holds, told by what each command writes first: ``"study"`` (a study
        record, or a capacity-gap or explanation-transfer study's ``teachers/`` or ``fractions/``),
        ``"comparison"`` (``seeds/`` or a compare record; a kd-vs-ls study is one until its study
        record is written), ``"sweep"`` (its ``study.db``, a sweep record or ``trial-NNNN/`` runs),
        ``"run"`` (its ``config.yaml``); None when it is empty, holds nothing xkd wrote, or is a file."""
        if self.is_empty() or not self.path.is_dir():
            return None
        if self.has_record("study") or any((self.path / d).is_dir() for d in STUDY_FOLDERS):
            return "study"
        if self.seeds.is_dir() or self.has_record("compare"):
            return "comparison"
        if self.has_record("sweep") or (self.path / SWEEP_DATABASE).is_file() or any(self.path.glob("trial-[0-9]*")):
            return "sweep"
        if self.config.is_file():
            return "run"
        return None

    def is_run(self) -> bool:
        """Whether the folder holds an xkd run (not a comparison, study or sweep, which also have a config)."""
        return self.kind() == "run"

    def is_finished(self) -> bool:
        """Whether a run finished: every record its report reads is there, and ``metrics.json``,
        written last (a resume removes it until it writes it again)."""
        records = all(self.has_record(k) for k in RUN_RECORDS) and self.samples_tensors.is_file()
        return records and self.metrics.is_file()

    def is_empty(self) -> bool:
        """Nothing there, or an empty folder (a file is not empty: it is in the way)."""
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def changed_settings(self, cfg: RunConfig) -> list[str] | None:
        """The settings of ``cfg`` that differ from the run's saved ``config.yaml``, as ``key: old -> new``
        (config paths as ``--set`` writes them; the key alone where a list changed length), leaving out
        the settings that change nothing it computed (:data:`RUN_READS_NOT`); None when there is no saved config or
        it cannot be read. The saved config is read as this xkd reads it, so a setting it did not have yet
        compares as its default."""
        try:
            saved = to_dict(from_dict(RunConfig, load_yaml(self.config.read_text())))
        except (OSError, yaml.YAMLError, XkdError):
            return None
        new = to_dict(cfg)
        for path in RUN_READS_NOT:
            for tree in (saved, new):
                *parents, last = path.split(".")
                for key in parents:
                    tree = tree.get(key) if isinstance(tree, dict) else None
                if isinstance(tree, dict):
                    tree.pop(last, None)
        return _differences(saved, new, "")

    def check(self, resume: bool, overwrite: bool) -> None:
        """Raise :class:`RunExistsError` when the folder cannot be used as asked; writes nothing.

        A folder that is not empty must hold an xkd run to be resumed or overwritten: ``--resume``
        into other files (or a comparison, study or sweep) would write the run among them."""
        if self.is_empty():
            return
        if not self.is_run():
            raise not_this_kind(self.path, self.kind(), "run", resume=resume, overwrite=overwrite)
        if not (resume or overwrite):
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


_ABSENT = object()


def _differences(old: Any, new: Any, path: str) -> list[str]:
    """Where plain data ``new`` differs from ``old``: ``path: old -> new`` per differing value, or
    ``path`` alone where a list changed length or a mapping or list took another type's place."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [*old, *(k for k in new if k not in old)]
        return [
            d
            for k in keys
            for d in _differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{path}.{k}" if path else str(k))
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{path}.{i}")]
    if old == new:
        return []
    if any(isinstance(v, (dict, list)) for v in (old, new)):
        return [path]
    shown = ["(unset)" if v is _ABSENT else v for v in (old, new)]
    return [f"{path}: {shown[0]} -> {shown[1]}"]


def not_this_kind(
    path: Path, found: str | None, wanted: str, *, resume: bool = False, overwrite: bool = False
) -> RunExistsError:
    """The error for folder ``path`` that ``xkd`` was asked to use as a ``wanted`` (run, comparison,
    study, sweep) but holds ``found`` (another kind, see :meth:`RunDir.kind`, e.g. ``"kd-vs-ls study"``,
    or None: files xkd did not write): one message naming what is there and the fix."""
    article = "an" if wanted[0] in "aeiou" else "a"
    if found is None:
        what = f"is not empty and is not an xkd {wanted} (it has no {RunDir.CONFIG} or other file xkd writes)"
    else:
        what = f"holds an xkd {found}, not {article} {wanted}"
    fix = "choose another name (--set name=NEW) or remove the folder"
    if found is not None and found != wanted:  # "kd-vs-ls study": `xkd study kd-vs-ls`
        name, _, kind = found.rpartition(" ")
        fix += f" (`{COMMANDS[kind]}{' ' + name if name else ''} --resume` continues what is there)"
    if overwrite:
        return RunExistsError(f"--overwrite: {path} {what}; refusing to delete it: {fix}")
    if resume:
        return RunExistsError(f"--resume: {path} {what}, so there is nothing to resume; {fix}")
    return RunExistsError(f"{path} {what}; {fix}")


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
