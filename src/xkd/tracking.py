"""Tracking a run: TensorBoard event files always (``train.tensorboard``, on by default), MLflow
when ``tracking.backend: mlflow`` asks for it.

Both are :class:`~xkd.engine.callbacks.Callback`\\ s that :func:`xkd.pipeline.run` creates with
:func:`callbacks_for` and calls before the callbacks it was given (an epoch is logged before a
caller's callback, an Optuna pruner, may stop the run there); only the writing rank (rank 0) gets
them.

TensorBoard (``tensorboard --logdir runs``): one TensorBoard run per model under
``<run>/tensorboard/<role>/`` with, per epoch, the training loss and each loss term, training and
validation accuracy, validation loss and macro-F1, learning rate and epoch time; at the end of the
run the model's test accuracy, cost and explanation and teacher-student agreement metrics, read
from the records. ``<run>/tensorboard/_run/`` holds one heat-map grid per explainer (the maps of the
report's sample images, from ``records/samples.safetensors``) and the config's hyper-parameters with
the final metrics (the HPARAMS tab), so runs and sweep trials under one log folder compare side by
side. A resumed or loaded model's history is written again from its record (or the run's own
``last.pt`` when that holds more epochs), replacing what an earlier process left, so every epoch
and final value appears once.

MLflow: a run in experiment ``tracking.experiment`` with the flattened config as params, every
model's epoch metrics prefixed by its role (``kd/accuracy/val``), the final metrics
(``kd/test/accuracy``) and ``config.yaml`` and ``metrics.json`` as artifacts. ``--resume`` continues
the MLflow run of the same run folder. mlflow is an optional extra, imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from xkd.config import RunConfig
from xkd.engine.callbacks import Callback
from xkd.engine.checkpoint import load_checkpoint
from xkd.errors import CheckpointError, ConfigError
from xkd.files import is_writer
from xkd.rundir import LAST, RunDir, mlflow_root
from xkd.schema import to_dict

log = logging.getLogger("xkd")

MLFLOW_INSTALL = "pip install 'xkd[mlflow]'"
HPARAM_SECTIONS_LEFT_OUT = "name output_dir cache_dir device evaluation compare study sweep tracking".split()
"""Config sections that are not hyper-parameters of the trained models (HPARAMS tab, MLflow params)."""
HPARAM_KEYS_LEFT_OUT = ("num_workers", "tensorboard")
GRID_COLUMNS = 16
"""At most this many sample images (columns) in a heat-map grid."""
GRID_CELL = 64
"""Small images are enlarged (nearest neighbour) to about this many pixels a side in the grid."""
GRID_WIDTH = 2048
"""Large images get fewer columns: the grid stays about this many pixels wide at most."""


# -- what is logged ---------------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    """``v`` as a finite float, or None (missing, not a number, a bool, NaN or infinite)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def epoch_scalars(stats: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard tags and values of one epoch's history entry."""
    out = {
        "loss/train": stats.get("train_loss"),
        "loss/val": stats.get("val_loss"),
        "accuracy/train": stats.get("train_accuracy"),
        "accuracy/val": stats.get("val_accuracy"),
        "macro_f1/val": stats.get("val_macro_f1"),
        "lr": stats.get("lr"),
        "epoch_seconds": stats.get("seconds"),
    }
    out |= {f"loss_terms/{k}": v for k, v in (stats.get("terms") or {}).items()}
    return {k: f for k, v in out.items() if (f := _number(v)) is not None}


def _column(source: Mapping[str, Any], column: Mapping[str, Any]) -> Any:
    """A declared metric column's value in a per-explainer record (fidelity and ROAD keep theirs
    under ``sub``)."""
    v = source.get(column["key"])
    if column.get("sub") is not None:
        return v.get(column["sub"]) if isinstance(v, dict) else None
    return v


def final_scalars(run_dir: RunDir) -> dict[str, dict[str, float]]:
    """Per role, the run's final numbers from its records: test accuracy, macro-F1 and loss (best
    checkpoint) and of the last epoch, post-hoc agreement with the teacher, cost, and per explainer
    its declared metrics (``explain/<explainer>/<metric>``) and agreement with the teacher's maps
    (``agreement/<explainer>/<metric>``), and FSS/RS."""
    models = run_dir.read_record("models")["models"]
    expl = run_dir.read_record("explanations") if run_dir.has_record("explanations") else {}
    own_cols, pair_cols = [], []
    for info in (expl.get("metric_info") or {}).values():
        if info.get("scope") == "model":
            own_cols += info.get("columns") or []
        elif info.get("scope") == "agreement":
            pair_cols += info.get("columns") or []
    out: dict[str, dict[str, float]] = {}
    for role, m in models.items():
        test, last, posthoc = m.get("test") or {}, m.get("test_last") or {}, m.get("posthoc") or {}
        raw: dict[str, Any] = {
            "test/accuracy": test.get("accuracy"),
            "test/macro_f1": test.get("macro_f1"),
            "test/loss": test.get("loss"),
            "test/accuracy_last_epoch": last.get("accuracy"),
            "test/macro_f1_last_epoch": last.get("macro_f1"),
            "posthoc/accuracy": posthoc.get("accuracy"),
            "posthoc/macro_f1": posthoc.get("macro_f1"),
            "cost/params": m.get("params"),
            "cost/flops": m.get("flops"),
            "cost/train_seconds": (m.get("train") or {}).get("seconds"),
        }
        raw |= {f"cost/explain_seconds/{ex}": v for ex, v in (m.get("met") or {}).items()}
        for ex, own in ((expl.get("per_model") or {}).get(role) or {}).items():
            raw |= {f"explain/{ex}/{c['key']}": _column(own or {}, c) for c in own_cols}
        for ex, pair in ((expl.get("agreement") or {}).get(role) or {}).items():
            raw |= {f"agreement/{ex}/{c['key']}": _column(pair or {}, c) for c in pair_cols}
        transfer = (expl.get("transfer") or {}).get(role) or {}
        raw["transfer/fss"] = transfer.get("fss")
        raw["transfer/rs"] = _column(transfer, {"key": "rs", "sub": "rs"})
        out[role] = {k: f for k, v in raw.items() if (f := _number(v)) is not None}
    return out


def _flatten(obj: Any, prefix: str, out: dict[str, bool | int | float | str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in HPARAM_KEYS_LEFT_OUT:
                _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}", out)
    elif isinstance(obj, (bool, int, float, str)):
        out[prefix] = obj
    else:  # None, a list of numbers (layer widths)
        out[prefix] = str(obj)


def hyperparameters(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """The config's training settings by config path (``train.optimizer.lr``,
    ``students.1.params.alpha``): seed, data, models, students and both training budgets (not the
    evaluation, where files go, or the comparison, study and sweep sections)."""
    raw = {k: v for k, v in to_dict(cfg).items() if k not in HPARAM_SECTIONS_LEFT_OUT}
    out: dict[str, bool | int | float | str] = {}
    _flatten(raw, "", out)
    return out


# -- the explanation grid ---------------------------------------------------------------------------


def jet(x: Tensor) -> Tensor:
    """The jet colour map of values in [0, 1]: (..., 3) RGB in [0, 1] (blue -> cyan -> yellow -> red)."""
    x = x.clamp(0, 1)[..., None]
    return (1.5 - (4 * x - torch.tensor([3.0, 2.0, 1.0])).abs()).clamp(0, 1)


def _normalise(m: Tensor) -> Tensor:
    """One map scaled to [0, 1] for display (a constant map becomes zeros), as the report shows it."""
    m = torch.nan_to_num(m.float(), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def _rgb(image: Tensor) -> Tensor:
    """(C, H, W) in [0, 1] -> (H, W, 3): gray replicated, RGB as is, other channel counts averaged."""
    image = torch.nan_to_num(image.float()).clamp(0, 1)
    if image.shape[0] == 3:
        return image.permute(1, 2, 0)
    return image.mean(0)[..., None].expand(*image.shape[1:], 3)


def explanation_grids(run_dir: RunDir, alpha: float = 0.5) -> dict[str, tuple[Tensor, str]]:
    """Per explainer, a heat-map grid of the report's sample images as an (H, W, 3) image in [0, 1]
    and its legend (markdown): the first row the images, then one row per model (teacher first), each
    map normalised to [0, 1] and drawn in the jet colour map at ``alpha`` over the image. Read from
    ``records/samples.safetensors``; empty when the run has no sample maps."""
    if not run_dir.samples_tensors.is_file() or not run_dir.has_record("samples"):
        return {}
    tensors = load_file(str(run_dir.samples_tensors))
    samples = run_dir.read_record("samples")
    roles = run_dir.read_record("models")["roles"]
    images = tensors.get("images")
    if images is None or images.ndim != 4 or len(images) == 0:
        return {}
    n, _, h, w = images.shape
    scale = max(1, GRID_CELL // max(h, w))
    k = max(2, min(GRID_COLUMNS, GRID_WIDTH // (w * scale + 2)))
    cols = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if n > k else list(range(n))
    labels, indices = samples.get("labels") or [], samples.get("indices") or list(range(n))
    names, preds = samples.get("class_names") or [], samples.get("predictions") or {}
    grids = {}
    for ex in samples.get("explainers") or []:
        rows = [r for r in roles if f"maps/{r}/{ex}" in tensors]
        if not rows:
            continue
        cells = []
        for r in [None, *rows]:
            row = []
            for c in cols:
                base = _rgb(images[c])
                if r is not None:
                    base = (1 - alpha) * base + alpha * jet(_normalise(tensors[f"maps/{r}/{ex}"][c]))
                row.append(base.repeat_interleave(scale, 0).repeat_interleave(scale, 1))
            cells.append(row)
        grids[ex] = (_tile(cells), _legend(ex, rows, cols, labels, indices, names, preds))
    return grids


def _tile(cells: list[list[Tensor]], pad: int = 2) -> Tensor:
    """Equal-sized (h, w, 3) cells laid out row by row with ``pad`` white pixels between them."""
    h, w, _ = cells[0][0].shape
    n_rows, n_cols = len(cells), len(cells[0])
    out = torch.ones(n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = cell
    return out


def _legend(ex: str, rows: list[str], cols: list[int], labels: list, indices: list, names: list, preds: dict) -> str:
    def name(k: Any) -> str:
        return str(names[k]) if isinstance(k, int) and 0 <= k < len(names) else str(k)

    head = "| row | " + " | ".join(f"#{indices[c]}" if c < len(indices) else str(c) for c in cols) + " |"
    lines = [f"**{ex}** maps (jet, normalised per map) over the test images.", "", head]
    lines.append("|---" * (len(cols) + 1) + "|")
    lines.append(
        "| image (true class) | " + " | ".join(name(labels[c]) if c < len(labels) else "" for c in cols) + " |"
    )
    for r in rows:
        p = preds.get(r) or []
        lines.append(f"| {r} (prediction) | " + " | ".join(name(p[c]) if c < len(p) else "" for c in cols) + " |")
    return "\n".join(lines)


# -- TensorBoard --------------------------------------------------------------------------------------


def full_history(run_dir: RunDir, role: str, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The longest known history of ``role``: its record's, or that of the run's own ``last.pt``
    when longer (a teacher loaded from the cache on ``--resume`` records the history of its best
    epoch only, while this run trained it further)."""
    last = run_dir.checkpoint(role, LAST)
    if last.is_file():
        try:
            kept = load_checkpoint(last).get("history") or []
        except CheckpointError:
            kept = []
        if isinstance(kept, list) and len(kept) > len(history):
            return kept
    return history


def _close_all(writers: dict[str, SummaryWriter]) -> None:
    for w in writers.values():
        w.close()
    writers.clear()


def _clear_events(folder: Path) -> None:
    """Delete the TensorBoard event files directly in ``folder`` (a history about to be rewritten)."""
    for f in folder.glob("events.out.tfevents.*"):
        f.unlink()


class TensorBoard(Callback):
    """Writes every model's epochs as they end, and at the end of the run the final metrics, the
    explanation grids and the hyper-parameters (see the module docstring for the layout)."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.writers: dict[str, SummaryWriter] = {}
        self.first_epoch: dict[str, int] = {}  # first epoch this process wrote, per role
        self.complete: set[str] = set()  # roles whose whole history is on disk
        # a run stopped by an exception (a pruned trial) never reaches on_train_end: close its writers
        # (and their threads) when the callback is dropped
        weakref.finalize(self, _close_all, self.writers)

    def enabled(self, role: str) -> bool:
        """Whether ``role``'s curves are written (``teacher.train.tensorboard: false`` leaves out the teacher)."""
        return role != "teacher" or self.cfg.teacher.train.tensorboard

    def on_epoch_end(self, role: str, epoch: int, stats: dict[str, Any]) -> None:
        if not self.enabled(role):
            return
        writer = self.writers.get(role)
        if writer is None:  # purge_step: a reader drops what an interrupted process wrote from here on
            writer = self.writers[role] = SummaryWriter(str(self.run_dir.tensorboard_dir(role)), purge_step=epoch)
            self.first_epoch[role] = epoch
        for tag, v in epoch_scalars(stats).items():
            writer.add_scalar(tag, v, epoch)
        writer.flush()

    def on_train_end(self, role: str, history: list[dict[str, Any]]) -> None:
        if not self.enabled(role):
            return
        writer = self.writers.pop(role, None)
        if writer is not None:
            writer.close()
        first = self.first_epoch.get(role)
        if history and (first is None or first > int(history[0].get("epoch", 1))):  # resumed or nothing left
            self.write_history(role, history)
        self.complete.add(role)

    def write_history(self, role: str, history: Sequence[Mapping[str, Any]]) -> None:
        """Replace ``role``'s event files by its whole ``history`` (a resumed or loaded model)."""
        folder = self.run_dir.tensorboard_dir(role)
        _clear_events(folder)
        start = int(history[0].get("epoch", 1)) if history else 1
        with SummaryWriter(str(folder), purge_step=start) as writer:
            for i, stats in enumerate(history, start=1):
                for tag, v in epoch_scalars(stats).items():
                    writer.add_scalar(tag, v, int(stats.get("epoch", i)))

    def on_run_end(self, run_dir: Path) -> None:
        rd = RunDir(run_dir)
        models = rd.read_record("models")["models"]
        finals = final_scalars(rd)
        for role, m in models.items():
            if not self.enabled(role):
                continue
            history = (m.get("train") or {}).get("history") or []
            if role not in self.complete:  # a teacher loaded from the cache or a checkpoint
                history = full_history(rd, role, history)
                self.write_history(role, history)
                self.complete.add(role)
            step = int(history[-1].get("epoch", len(history))) if history else 0
            with SummaryWriter(str(rd.tensorboard_dir(role))) as writer:
                for tag, v in finals.get(role, {}).items():
                    writer.add_scalar(tag, v, step)
        folder = rd.tensorboard_dir(None)
        _clear_events(folder)
        with SummaryWriter(str(folder), purge_step=0) as writer:
            for ex, (grid, legend) in explanation_grids(rd).items():
                writer.add_image(f"explanations/{ex}", grid, 0, dataformats="HWC")
                writer.add_text(f"explanations/{ex}", legend, 0)
            write_hparams(writer, hyperparameters(self.cfg), hparam_metrics(finals))


def hparam_metrics(finals: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The final metrics of the HPARAMS table, ``<role>/<tag>``: test and post-hoc scores,
    explanation and agreement metrics and FSS/RS (the cost columns stay in each model's scalars)."""
    return {
        f"{role}/{tag}": v for role, vals in finals.items() for tag, v in vals.items() if not tag.startswith("cost/")
    }


def write_hparams(writer: SummaryWriter, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """What :meth:`SummaryWriter.add_hparams` writes, in ``writer``'s own folder rather than a new
    sub-folder, and without the experiment summary: TensorBoard uses the first experiment summary it
    finds for every session, so runs whose configs have other keys or students would lose their
    columns; without one it gathers the hyper-parameters and metrics of all sessions under the log
    folder."""
    _, start, end = hparams_summary(hparams, metrics)
    writer.file_writer.add_summary(start)
    writer.file_writer.add_summary(end)
    for tag, v in metrics.items():
        writer.add_scalar(tag, v, 0)


# -- MLflow -------------------------------------------------------------------------------------------


def check(cfg: RunConfig) -> None:
    """Raise :class:`~xkd.errors.ConfigError` when ``cfg`` asks for a tracker that is not installed
    (call it when validating a config, before anything trains)."""
    if cfg.tracking.backend == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"tracking.backend: mlflow needs the mlflow package, which is not installed; run `{MLFLOW_INSTALL}` "
            "or set tracking.backend: none"
        )


def mlflow_uri(cfg: RunConfig) -> tuple[str, bool]:
    """The MLflow tracking URI and whether it is xkd's local store: ``tracking.uri``; else
    ``$MLFLOW_TRACKING_URI``; else a SQLite store under ``output_dir`` (:func:`xkd.rundir.mlflow_root`;
    MLflow 3 refuses its plain-file store unless told otherwise)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri, False
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], False
    return f"sqlite:///{(mlflow_root(cfg) / 'mlflow.db').resolve()}", True


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_ - . : /`` and spaces)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class MLflow(Callback):
    """Logs the run to MLflow (see the module docstring). The MLflow run is opened when the callback
    is created (a wrong URI fails before training); a failure to log later is a warning, never the
    end of a training."""

    PARAM_CHARS = 500

    def __init__(self, cfg: RunConfig, run_dir: RunDir, resume: bool = False) -> None:
        check(cfg)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.cfg, self.run_dir = cfg, run_dir
        self.uri, local = mlflow_uri(cfg)
        self.first_epoch: dict[str, int] = {}
        self.complete: set[str] = set()
        path = str(run_dir.path.resolve())
        try:
            if local:
                mlflow_root(cfg).mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
            if exp is not None:
                exp_id = exp.experiment_id
            else:  # the local store keeps its artifacts beside it, not in the working directory
                where = (mlflow_root(cfg) / "artifacts").resolve().as_uri() if local else None
                exp_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=where)
            found = []
            if resume and "'" not in path:  # the MLflow run this run folder logged to before
                order = ["attributes.start_time DESC"]
                found = self.client.search_runs([exp_id], f"tags.`xkd.run_dir` = '{path}'", order_by=order)
            if found:
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                tags = {"xkd.run_dir": path, "xkd.name": cfg.name}
                self.run_id = self.client.create_run(exp_id, run_name=cfg.name, tags=tags).info.run_id
                params = [Param(_key(k), str(v)[: self.PARAM_CHARS]) for k, v in hyperparameters(cfg).items()]
                for batch in _batches(params, 100):
                    self.client.log_batch(self.run_id, params=batch)
        except Exception as e:  # any failure to reach or use the store: the URI or the server is wrong
            raise ConfigError(
                f"tracking: cannot log to MLflow at {self.uri!r} ({type(e).__name__}: {e}); check tracking.uri "
                "or set tracking.backend: none"
            ) from e
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, cfg.tracking.experiment, self.uri)
        self.open = {"run": True}  # a run stopped before its end (a pruned trial) is marked KILLED
        weakref.finalize(self, _kill, self.client, self.run_id, self.open)

    def _log(self, metrics: list) -> None:
        try:
            for batch in _batches(metrics, 1000):
                self.client.log_batch(self.run_id, metrics=batch)
        except Exception as e:  # a tracking outage must not stop a training
            log.warning("MLflow: could not log %d metric(s) (%s: %s)", len(metrics), type(e).__name__, e)

    def _epoch_metrics(self, role: str, history: Sequence[Mapping[str, Any]]) -> list:
        now = int(time.time() * 1000)
        return [
            self.Metric(_key(f"{role}/{tag}"), v, now, int(stats.get("epoch", i)))
            for i, stats in enumerate(history, start=1)
            for tag, v in epoch_scalars(stats).items()
        ]

    def on_epoch_end(self, role: str, epoch: int, stats: dict[str, Any]) -> None:
        self.first_epoch.setdefault(role, epoch)
        self._log(self._epoch_metrics(role, [stats]))

    def _fill(self, role: str, history: Sequence[Mapping[str, Any]]) -> None:
        """Log the epochs of ``history`` the MLflow run does not hold yet (a resumed or loaded model)."""
        try:
            logged = {m.step for m in self.client.get_metric_history(self.run_id, _key(f"{role}/loss/train"))}
        except Exception:
            logged = set()
        missing = [h for i, h in enumerate(history, start=1) if int(h.get("epoch", i)) not in logged]
        self._log(self._epoch_metrics(role, missing))
        self.complete.add(role)

    def on_train_end(self, role: str, history: list[dict[str, Any]]) -> None:
        first = self.first_epoch.get(role)
        if history and (first is None or first > int(history[0].get("epoch", 1))):
            self._fill(role, history)
        self.complete.add(role)

    def on_run_end(self, run_dir: Path) -> None:
        rd = RunDir(run_dir)
        for role, m in rd.read_record("models")["models"].items():
            if role not in self.complete:
                self._fill(role, full_history(rd, role, (m.get("train") or {}).get("history") or []))
        now = int(time.time() * 1000)
        finals = final_scalars(rd)
        self._log(
            [self.Metric(_key(f"{role}/{t}"), v, now, 0) for role, vals in finals.items() for t, v in vals.items()]
        )
        try:
            for path in (rd.config, rd.metrics):
                self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, "FINISHED")
            self.open["run"] = False
        except Exception as e:
            log.warning("MLflow: could not finish run %s (%s: %s)", self.run_id, type(e).__name__, e)


def _kill(client: Any, run_id: str, state: dict[str, bool]) -> None:
    if state["run"]:
        try:
            client.set_terminated(run_id, "KILLED")
        except Exception:  # the store is gone (interpreter exit): the run stays RUNNING
            pass


# -- what the pipeline calls --------------------------------------------------------------------------


def callbacks_for(cfg: RunConfig, run_dir: RunDir, resume: bool = False) -> list[Callback]:
    """The tracking callbacks ``cfg`` asks for (none off the writing rank): TensorBoard unless
    ``train.tensorboard`` is false, MLflow when ``tracking.backend`` is ``mlflow``."""
    check(cfg)
    if not is_writer():
        return []
    out: list[Callback] = []
    if cfg.train.tensorboard:
        out.append(TensorBoard(cfg, run_dir))
    if cfg.tracking.backend == "mlflow":
        out.append(MLflow(cfg, run_dir, resume))
    return out
