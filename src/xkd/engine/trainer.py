"""The only training loop.

Sums a distiller's loss dict, steps the optimiser, evaluates on the validation split every epoch,
keeps the best and the last checkpoint (resumable), shows rich progress bars, and stops with a clear
error when the loss becomes NaN or infinite, keeping the last good checkpoint. The same code runs
on one process or under ``torchrun`` (DistributedDataParallel; only rank 0 writes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler

from xkd.config import ConfigError, TrainConfig
from xkd.data.augment import BatchAugment
from xkd.data.base import BatchLoader
from xkd.distill.base import Distiller, check_forward, num_classes_of
from xkd.engine import distributed as D
from xkd.engine.callbacks import Callback, call
from xkd.engine.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from xkd.engine.runtime import (
    PRECISION_NAMES,
    build_optimizer,
    build_scheduler,
    check_budget,
    device_name,
    on_device,
    out_of_memory_line,
    resolve_amp,
)
from xkd.errors import DeviceMemoryError, NonFiniteLossError
from xkd.metrics.classification import evaluate_model
from xkd.rundir import BEST, LAST
from xkd.schema import to_dict

log = logging.getLogger("xkd")


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns; ``history`` has one dict per epoch.

    ``seconds`` is the wall time of the epoch loop (training and validation), over every process that
    trained the model (a resumed training adds the time its checkpoint recorded): a distiller's
    :meth:`~xkd.distill.base.Distiller.setup` and a teacher assistant's training are added by
    :class:`xkd.engine.trained.TrainedModel`. ``None`` when unknown (a model loaded from a checkpoint
    without a record of how long it trained)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = float("-inf")
    seconds: float | None = 0.0
    best_path: Path | None = None
    last_path: Path | None = None
    device: str | None = None
    precision: str | None = None
    peak_memory_bytes: int | None = None
    optimizer: str | None = None

    def images_per_second(self) -> float | None:
        """Training throughput: images per second of the training loop, over every epoch run."""
        seen = [(h.get("images"), h.get("seconds")) for h in self.history]
        n, t = sum(i or 0 for i, _ in seen), sum(s or 0.0 for _, s in seen)
        return n / t if n and t else None

    def record(self) -> dict[str, Any]:
        """How the training ran, for the model's record."""
        return {
            "device": self.device,
            "precision": self.precision,
            "images_per_second": self.images_per_second(),
            "peak_memory_bytes": self.peak_memory_bytes,
            "optimizer": self.optimizer,
        }


def _warn_untrained(distiller: Distiller, trained: nn.Module, role: str) -> None:
    """Say so when the distiller has trainable parameters outside ``trainable_modules()`` (an adapter a
    user's ``setup`` built but did not return): they would be neither optimised nor checkpointed."""
    kept = {id(p) for p in trained.parameters()}
    if distiller.teacher is not None:
        kept |= {id(p) for p in distiller.teacher.parameters()}
    left = [n for n, p in distiller.named_parameters() if p.requires_grad and id(p) not in kept]
    if left:
        log.warning(
            "%s: %d parameter(s) of distiller %r (%s) are not in its trainable_modules(), so they are neither "
            "trained nor checkpointed; return their modules from trainable_modules()",
            role, len(left), distiller.registry_name or type(distiller).__name__, ", ".join(left[:3]),
        )  # fmt: skip


def validation_batch_size(batch_size: int) -> int:
    """Images per validation batch: at least the training batch, up to 256 but at most 4x the training
    batch (no gradients are kept, so 4x fits where training fits, and a small training batch, chosen
    for memory, is not validated at 256)."""
    return max(batch_size, min(256, 4 * batch_size))


SYNC_EVERY = 25
"""Training steps between two reads of the running loss and accuracy (each read waits for the device)."""


class Trainer:
    """Train a :class:`~xkd.distill.base.Distiller` (whose student may be a teacher being trained
    with ``scratch``).

    Args:
        distiller: the method; its ``trainable_modules()`` are optimised and checkpointed.
        train_data, val_data: map-style datasets of ``(image, label, mask)``.
        cfg: optimiser, scheduler, epochs, batch size.
        checkpoint_dir: where ``last.pt`` and ``best.pt`` go (None: keep nothing on disk).
        seed: seeds the shuffling; epoch ``e`` always sees the same order, also after ``--resume``.
        device: where to train.
        role: name shown in progress bars and errors (``teacher``, a student name).
        progress: show rich progress bars (rank 0 only).
        augment: random augmentation of the training batches, on the device (``data.augment``);
            epoch ``e``'s draws come from a generator seeded by the seed and ``e``, so a resumed run
            sees the batches it would have seen (on a GPU the generator is the GPU's: the same seed
            gives other draws there than on the CPU). Validation never augments.
        callbacks: :class:`~xkd.engine.callbacks.Callback` hooks called at the start, after every
            epoch (once its checkpoints are written) and at the end of training, on rank 0.
    """

    def __init__(
        self,
        distiller: Distiller,
        train_data: Dataset,
        val_data: Dataset,
        cfg: TrainConfig,
        *,
        checkpoint_dir: str | Path | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        role: str = "model",
        progress: bool = True,
        console: Console | None = None,
        augment: BatchAugment | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        check_budget(cfg, "cfg")  # from Python, epochs 0 trained nothing without a word
        self.distiller = distiller
        self.callbacks = list(callbacks) if D.current().is_main else []
        self.augment = augment if augment is not None and augment.enabled else None
        self.cfg = cfg
        self.seed = seed
        self.device = torch.device(device)
        self.role = role
        self.dist = D.current()
        self.progress = progress and self.dist.is_main
        self.console = console or Console(stderr=True)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.train_data, self.val_data = on_device(train_data, self.device), on_device(val_data, self.device)
        self.num_classes = num_classes_of(distiller.student)
        if self.num_classes is None:
            raise ConfigError(
                f"cannot tell how many classes {type(distiller.student).__name__} predicts; give it a "
                "`num_classes` attribute (xkd's build_model sets one)"
            )
        self.modules = distiller.trainable_modules()
        _warn_untrained(distiller, self.modules, role)
        self.modules.to(self.device)  # before the optimiser: older torch checks a fused one's devices here
        params = [p for p in self.modules.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.amp = resolve_amp(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp is torch.float16 else None
        self.val_loader = BatchLoader(self.val_data, validation_batch_size(cfg.batch_size), num_workers=cfg.num_workers)

    def _train_loader(self, epoch: int) -> BatchLoader:
        """Epoch ``epoch``'s batches: a permutation seeded by the run's seed and the epoch (the same
        order as :class:`~torch.utils.data.RandomSampler` with that generator), or this rank's share
        under torchrun."""
        if self.dist.enabled:
            sampler = DistributedSampler(self.train_data, shuffle=True, seed=self.seed, drop_last=False)
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), dtype=torch.long)
        else:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.train_data), generator=g)  # type: ignore[arg-type]
        return BatchLoader(
            self.train_data,
            self.cfg.batch_size,
            order,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self, epoch: int, result: TrainResult) -> dict[str, Any]:
        state: dict[str, Any] = {
            "role": self.role,
            "epoch": epoch,
            "model": self.modules.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": result.history,
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            # the training's wall time so far, over every process: a resumed training adds what it spends
            "seconds": self.seconds_before + time.perf_counter() - self.started,
            "distiller_params": self._params(),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _resume(self, result: TrainResult) -> int:
        """Restore from ``last.pt``; returns the next epoch to run (1 when there is nothing to resume)."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / LAST).is_file():
            return 1
        path = self.checkpoint_dir / LAST
        state = load_checkpoint(path)
        if state.get("format") == "state_dict":
            raise CheckpointError(f"{path} holds bare weights, not a resumable xkd checkpoint")
        held, now = state.get("distiller_params"), self._params()
        if held is not None and now is not None and held != now:  # a default changed in the code, not the config
            changed = ", ".join(f"{k}: {held.get(k)!r} -> {now.get(k)!r}" for k in now if held.get(k) != now.get(k))
            raise CheckpointError(
                f"{self.role}: {path} was trained with other distiller parameters ({changed or 'keys differ'}); "
                "resume with the parameters it was trained with, or start over (--overwrite)"
            )
        load_weights(self.modules, state["model"], str(path))
        saved = state["optimizer"]
        for group in saved["param_groups"]:  # this run's implementation (fused or not), not the checkpoint's
            group.update({k: self.optimizer.defaults[k] for k in ("fused", "foreach") if k in self.optimizer.defaults})
        self.optimizer.load_state_dict(saved)
        # moments saved under the other train.channels_last keep that memory layout; torch's fused
        # kernels (fused: auto on a GPU) refuse a parameter and a moment of different layouts
        for param, slots in self.optimizer.state.items():
            for key, value in slots.items():
                if isinstance(value, Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    slots[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        result.history = list(state["history"])
        # a checkpoint written before the time was kept in it: the epochs' own times (training, no validation)
        before = state.get("seconds", sum(float(h.get("seconds") or 0.0) for h in result.history))
        self.seconds_before = float(before)
        result.best_epoch = int(state["best_epoch"])
        result.best_val_accuracy = float(state["best_val_accuracy"])
        log.info("%s: resumed from %s after epoch %d", self.role, path, state["epoch"])
        return int(state["epoch"]) + 1

    def _params(self) -> dict[str, Any] | None:
        """The distiller's resolved parameters as plain data (its defaults included), kept in checkpoints:
        a resume under other ones (a default changed in a user's or xkd's code) is refused."""
        params = getattr(self.distiller, "params", None)
        if not dataclasses.is_dataclass(params) or isinstance(params, type):
            return None
        # as JSON would hold them: an Any-typed value (a YAML date, a numpy scalar) made the checkpoint unreadable
        return json.loads(json.dumps(to_dict(params), default=repr))

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Train for ``cfg.epochs`` epochs (continuing from ``last.pt`` when ``resume``)."""
        result = TrainResult()
        if self.checkpoint_dir is not None:
            result.best_path, result.last_path = self.checkpoint_dir / BEST, self.checkpoint_dir / LAST
        # on the device before resuming: the optimiser's restored state follows its parameters' device
        self.distiller.to(self.device)
        if self.cfg.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.seconds_before = 0.0  # the time earlier processes spent training it (from the checkpoint)
        start = self._resume(result) if resume else 1
        model: nn.Module = self.distiller
        if self.dist.enabled:
            model = nn.parallel.DistributedDataParallel(
                self.distiller, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.cfg.compile:
            model = torch.compile(model)
        result.device = device_name(self.device)
        result.precision = PRECISION_NAMES[self.amp]
        fused = " (fused)" if self.optimizer.param_groups[0].get("fused") else ""
        result.optimizer = f"{type(self.optimizer).__name__.lower()}{fused}"
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = self.started = time.perf_counter()
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.progress,
            transient=False,
        )
        call(self.callbacks, "on_train_start", self.role, self.cfg.epochs)
        with progress:
            for epoch in range(start, self.cfg.epochs + 1):
                try:
                    stats = self._train_epoch(model, epoch, progress)
                except torch.cuda.OutOfMemoryError as e:
                    raise self._out_of_memory(epoch, e) from None
                self._sync_buffers()
                val = self._validate(epoch)
                stats.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_macro_f1=val["macro_f1"])
                result.history.append(stats)
                if self.scheduler is not None:
                    self.scheduler.step()
                # the epoch's line: without bars, or where live bars do not draw (not a terminal)
                if self.dist.is_main and not (self.progress and self.console.is_terminal):
                    self.console.print(
                        f"{self.role} epoch {epoch}/{self.cfg.epochs}: loss {stats['train_loss']:.4f}, "
                        f"val accuracy {val['accuracy']:.4f} ({stats['seconds']:.1f} s)"
                    )
                improved = val["accuracy"] > result.best_val_accuracy
                if improved:
                    result.best_epoch, result.best_val_accuracy = epoch, val["accuracy"]
                if self.checkpoint_dir is not None and self.dist.is_main:
                    state = self._state(epoch, result)
                    if improved:
                        save_checkpoint(self.checkpoint_dir / BEST, state)
                    save_checkpoint(self.checkpoint_dir / LAST, state)
                call(self.callbacks, "on_epoch_end", self.role, epoch, stats)
        result.seconds = self.seconds_before + time.perf_counter() - t0
        if self.device.type == "cuda":
            result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device))
        call(self.callbacks, "on_train_end", self.role, result.history)
        D.barrier()
        return result

    def _validate(self, epoch: int) -> dict[str, Any]:
        """The student's validation scores. Out of memory at the validation batch (up to 4x the training
        batch), it validates at the training batch instead, from then on: the scores are the same."""
        while True:
            try:
                return evaluate_model(self.distiller.student, self.val_loader, self.num_classes, self.device)
            except torch.cuda.OutOfMemoryError as e:
                if self.val_loader.batch_size <= self.cfg.batch_size:
                    raise self._out_of_memory(epoch, e, validating=True) from None
            log.warning(
                "%s: out of memory validating %d images per batch; validating %d per batch from now on",
                self.role, self.val_loader.batch_size, self.cfg.batch_size,
            )  # fmt: skip
            torch.cuda.empty_cache()
            self.val_loader = BatchLoader(self.val_data, self.cfg.batch_size, num_workers=self.cfg.num_workers)

    def _out_of_memory(self, epoch: int, error: Exception, validating: bool = False) -> DeviceMemoryError:
        kept = "" if self.checkpoint_dir is None else "; the last checkpoint is kept: rerun with --resume"
        doing = f"validating after epoch {epoch}" if validating else f"in epoch {epoch}"
        half = max(1, self.cfg.batch_size // 2)
        return DeviceMemoryError(
            f"{self.role}: {device_name(self.device)} ran out of memory {doing} at batch size "
            f"{self.cfg.batch_size} ({out_of_memory_line(error)}); lower train.batch_size (e.g. {half}) "
            f"or set train.amp: bf16{kept}"
        )

    def fit_and_restore(self, resume: bool = False, restore: str = BEST) -> TrainResult:
        """:meth:`fit`, then load the weights of checkpoint ``restore`` (``best.pt``: the best
        validation epoch; ``last.pt``: the last epoch) into the distiller's trainable modules."""
        result = self.fit(resume=resume)
        self.restore(restore)
        return result

    def restore(self, which: str = BEST) -> None:
        """Load the weights of checkpoint ``which`` (``best.pt`` or ``last.pt``) of this trainer's
        ``checkpoint_dir`` into the distiller's trainable modules (every rank, after rank 0 wrote it)."""
        if self.checkpoint_dir is None:
            raise ValueError("restore needs a checkpoint_dir to restore from")
        D.barrier()
        path = self.checkpoint_dir / which
        load_weights(self.distiller.trainable_modules(), load_checkpoint(path)["model"], str(path))

    def _sync_buffers(self) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) to every rank after an epoch.

        DDP broadcasts buffers before each forward pass, so after the last step each rank holds the
        statistics of its own last batch; syncing makes every rank evaluate and keep the same model.
        """
        if self.dist.enabled:
            for b in self.modules.buffers():
                torch.distributed.broadcast(b, src=0)

    def _train_epoch(self, model: nn.Module, epoch: int, progress: Progress) -> dict[str, Any]:
        model.train()
        loader = self._train_loader(epoch)
        steps = len(loader) if self.cfg.max_steps_per_epoch is None else min(len(loader), self.cfg.max_steps_per_epoch)
        task = progress.add_task(f"{self.role} epoch {epoch}/{self.cfg.epochs}", total=steps, stats="")
        t0 = time.perf_counter()
        # Bookkeeping stays on the device and is read every SYNC_EVERY steps: no host sync per step, and
        # few kernels per step (on a GPU a small model's step is launch-bound, so each one counts). Each
        # step's loss, terms and number of correct predictions go into one row of `window` (argmax, eq,
        # sum and one stack: 4 kernels); at every check the window's rows are weighted by their batch
        # sizes (kept on the host) and added to `sums`. A NaN/inf loss makes `sums` non-finite for the
        # rest of the epoch, so one check per window finds it, and the window's rows tell which step.
        n = 0
        sums: Tensor | None = None  # (1 + terms + 1,) float64: loss and terms summed over images, correct
        window: Tensor | None = None  # (SYNC_EVERY, 1 + terms + 1): loss, terms, correct of recent steps
        sizes: list[int] = []  # the batch sizes of the window's steps
        totals: list[float] | None = None  # `sums` as last read on the host
        names: list[str] = []
        # on a GPU the draws are made there: copying CPU draws from pageable memory would make the
        # stream wait for the device at every augmented step
        draws = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
        draws.manual_seed(self.seed * 1_000_003 + epoch)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
        )
        for step, batch in enumerate(loader, start=1):
            if step > steps:
                break
            batch = batch.to(self.device)
            if self.augment is not None:
                batch.images = self.augment(batch.images, draws)
            if self.cfg.channels_last:
                batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            with autocast:
                output = model(batch)
            if window is None:  # the first step: a user's distiller named before its output is used
                check_forward(
                    output,
                    len(batch),
                    f"distiller {self.distiller.registry_name or type(self.distiller).__name__!r} ({self.role})",
                    self.num_classes,
                )
            logits, terms = output
            parts = [t.float() for t in terms.values()]
            loss = parts[0]
            for t in parts[1:]:
                loss = loss + t
            if window is None:
                names = list(terms)
                window = torch.zeros((SYNC_EVERY, 2 + len(parts)), dtype=torch.float32, device=self.device)
                sums = torch.zeros(2 + len(parts), dtype=torch.float64, device=self.device)
            hits = (logits.detach().argmax(1) == batch.labels).sum()
            torch.stack([loss.detach(), *(t.detach() for t in parts), hits], out=window[len(sizes)])
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            b = len(batch)
            n += b
            sizes.append(b)
            if len(sizes) == SYNC_EVERY or step == steps:
                rows = window[: len(sizes)]
                weights = torch.tensor(sizes, dtype=torch.float64).to(self.device, non_blocking=True)
                sums[:-1].add_((rows[:, :-1].double() * weights[:, None]).sum(dim=0))
                sums[-1].add_(rows[:, -1].double().sum())
                totals = sums.tolist()  # the one read of the device per window
                if not all(map(math.isfinite, totals)):
                    bad = int((~torch.isfinite(rows[:, 0])).nonzero()[0, 0])
                    self._non_finite(epoch, step - len(sizes) + bad + 1, rows[bad, :-1], names)
                sizes.clear()
                progress.update(task, completed=step, stats=f"loss {totals[0] / n:.4f}  acc {totals[-1] / n:.3f}")
        if totals is None:  # no step ran
            totals = [0.0] * (2 + len(names))
        loss_sum, term_sums, correct = totals[0], dict(zip(names, totals[1:-1])), int(totals[-1])
        return {
            "epoch": epoch,
            "train_loss": loss_sum / max(n, 1),
            "terms": {k: v / max(n, 1) for k, v in term_sums.items()},
            "train_accuracy": correct / max(n, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
            "images": n,
        }

    def _non_finite(self, epoch: int, step: int, values: Tensor, names: list[str]) -> None:
        """Stop at the first step whose loss was NaN or infinite (``values``: that step's loss and
        terms, in the order of ``names``)."""
        vals = values.tolist()
        detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, vals[1:]))
        kept = "no checkpoint was written yet"
        if self.checkpoint_dir is not None and (self.checkpoint_dir / LAST).is_file():
            kept = f"the last good checkpoint is kept at {self.checkpoint_dir / 'last.pt'} (epoch {epoch - 1})"
        raise NonFiniteLossError(
            f"{self.role}: the loss became {vals[0]} at epoch {epoch}, step {step} ({detail}); training "
            f"stopped and {kept}. Lower the learning rate (train.optimizer.lr) or check the data for NaN/inf, "
            "then rerun (with --resume to continue from the checkpoint)."
        )
