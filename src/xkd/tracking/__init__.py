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

from xkd.config import RunConfig
from xkd.engine.callbacks import Callback
from xkd.files import is_writer
from xkd.rundir import RunDir
from xkd.tracking.logged import GRID_CELL, full_history, jet
from xkd.tracking.mlflow_log import MLflow, check, mlflow_uri
from xkd.tracking.tensorboard import TensorBoard

__all__ = [
    "GRID_CELL",
    "MLflow",
    "TensorBoard",
    "callbacks_for",
    "check",
    "full_history",
    "jet",
    "mlflow_uri",
]

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
