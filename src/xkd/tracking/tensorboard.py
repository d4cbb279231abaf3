"""TensorBoard event files of a run (see :mod:`xkd.tracking` for the layout)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from xkd.config import RunConfig
from xkd.engine.callbacks import Callback
from xkd.errors import ConfigError
from xkd.rundir import RunDir
from xkd.tracking.logged import epoch_scalars, explanation_grids, final_scalars, full_history, hyperparameters

# -- TensorBoard --------------------------------------------------------------------------------------


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

    def on_train_start(self, role: str, epochs: int) -> None:
        """Before the first model trains: a ``tensorboard`` that is not a folder is one error, not a
        traceback in the middle of the run."""
        for folder in (self.run_dir.tensorboard, self.run_dir.tensorboard_dir(role)):
            if folder.exists() and not folder.is_dir():
                raise ConfigError(
                    f"{folder} is a file where the run writes its TensorBoard events; move it away, or set "
                    "train.tensorboard: false"
                )

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

    def write_history(
        self, role: str, history: Sequence[Mapping[str, Any]], finals: Mapping[str, float] | None = None
    ) -> None:
        """Replace ``role``'s event files by its whole ``history`` (and its ``finals``, at the last
        epoch): one file, without a purge step, for there is nothing left to purge (a purge step made
        TensorBoard's ``EventAccumulator`` drop the final values of a file whose name sorted first)."""
        folder = self.run_dir.tensorboard_dir(role)
        _clear_events(folder)
        with SummaryWriter(str(folder)) as writer:
            for i, stats in enumerate(history, start=1):
                for tag, v in epoch_scalars(stats).items():
                    writer.add_scalar(tag, v, int(stats.get("epoch", i)))
            step = int(history[-1].get("epoch", len(history))) if history else 0
            for tag, v in (finals or {}).items():
                writer.add_scalar(tag, v, step)

    def on_run_end(self, run_dir: Path) -> None:
        rd = RunDir(run_dir)
        models = rd.read_record("models")["models"]
        finals = final_scalars(rd)
        for role, m in models.items():
            if self.enabled(role):  # each model's whole history and final values, written once
                history = (m.get("train") or {}).get("history") or []
                if role not in self.complete:  # loaded, not trained here: its last.pt may hold more epochs
                    history = full_history(rd, role, history)
                self.write_history(role, history, finals.get(role, {}))
                self.complete.add(role)
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
