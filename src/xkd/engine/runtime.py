"""How a training runs on its device: precision (``train.amp``), where in-memory data is held,
determinism, the optimiser and its schedule, and the teacher-logit pass; used by
:class:`xkd.engine.trainer.Trainer` and the pipeline."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from xkd.config import ConfigError, TrainConfig
from xkd.data.base import BatchLoader, TensorImageDataset
from xkd.errors import DeviceMemoryError

PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_budget(t: TrainConfig, path: str = "train") -> None:
    """Raise :class:`ConfigError` when ``t`` would train nothing (``path``: where it is, for the message)."""
    if t.epochs < 1:
        raise ConfigError(f"{path}.epochs must be >= 1, got {t.epochs}")
    if t.batch_size < 1:
        raise ConfigError(f"{path}.batch_size must be >= 1, got {t.batch_size}")
    if t.max_steps_per_epoch is not None and t.max_steps_per_epoch < 1:
        raise ConfigError(f"{path}.max_steps_per_epoch must be >= 1 or null, got {t.max_steps_per_epoch}")


def check_train_config(t: TrainConfig, path: str = "train") -> None:
    """A config's ``t`` checked: its budget, and a learning rate and step schedule that learn (from
    Python, :class:`~xkd.engine.Trainer` accepts lr 0, e.g. to measure without learning)."""
    check_budget(t, path)
    if t.optimizer.lr <= 0:
        raise ConfigError(f"{path}.optimizer.lr must be > 0, got {t.optimizer.lr}")
    if t.scheduler.name == "step" and (t.scheduler.step_size < 1 or not t.scheduler.gamma > 0):
        raise ConfigError(
            f"{path}.scheduler: step needs step_size >= 1 and gamma > 0 (the lr is multiplied by gamma every "
            f"step_size epochs), got step_size {t.scheduler.step_size}, gamma {t.scheduler.gamma}"
        )


def resolve_amp(amp: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: full precision); ``key`` names the
    setting in errors (``teacher.train.amp`` for the teacher's).

    Raises:
        ConfigError: ``fp16`` off a CUDA device, or ``bf16`` on a GPU without bf16.
    """
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                f"{key}: fp16 needs a CUDA device (it trains with a gradient scaler); on {device.type} use bf16 or off"
            )
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"{key}: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 (with a "
            "gradient scaler) or off"
        )
    return torch.bfloat16


DEVICE_DATA_SHARE = 0.25
"""In-memory data is held on a GPU when it takes at most this share of the device's free memory."""


def on_device(dataset: Dataset, device: torch.device) -> Dataset:
    """``dataset`` held on ``device`` once (an in-memory dataset on a GPU with room for it: batches
    are then gathered there, with no copy per step; uint8 images are scaled to float there once when
    that fits too, one kernel less per step); otherwise ``dataset`` itself. A split that wraps an
    in-memory one (an image folder with concept masks) is held as the split it wraps: training reads
    images and labels only."""
    if device.type != "cuda":
        return dataset
    if not isinstance(dataset, TensorImageDataset):
        wrapped = dataset.__dict__.get("base")
        if not isinstance(wrapped, TensorImageDataset):
            return dataset
        dataset = wrapped
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cached blocks
    if dataset.nbytes() > DEVICE_DATA_SHARE * free:
        return dataset
    held = dataset.to(device)
    as_float = held.nbytes() + 4 * held.images.numel()  # the float images beside the uint8 ones, at the peak
    return held.scaled() if held.images.dtype == torch.uint8 and as_float <= DEVICE_DATA_SHARE * free else held


def device_name(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)``, or ``cpu (2 threads)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def out_of_memory_line(error: Exception) -> str:
    """The first line of torch's out-of-memory message (which allocation failed)."""
    return (str(error).strip().splitlines() or ["CUDA out of memory"])[0]


@contextlib.contextmanager
def device_memory_errors(device: torch.device, what: str, advice: str) -> Iterator[None]:
    """Turns torch's out-of-memory error inside the block into one :class:`~xkd.errors.DeviceMemoryError`
    saying ``what`` ran out, torch's first line (which allocation) and ``advice`` (the setting to lower)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise DeviceMemoryError(
            f"{device_name(device)} ran out of memory {what} ({out_of_memory_line(e)}): {advice}"
        ) from None


def configure_determinism(on: bool) -> None:
    """Ask torch for deterministic algorithms (``deterministic: true``): same seed, same numbers on
    the CPU; on a GPU, operations without a deterministic implementation warn instead of failing."""
    if not on:  # leave torch's settings as the caller has them
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256) -> Tensor:
    """``model``'s logits (float32, on the CPU) for every item of ``dataset``, in index order, in
    eval mode; the model's train/eval flag is restored."""
    was_training = model.training
    model.eval()
    try:
        out = [model(b.images.to(device)).float().cpu() for b in BatchLoader(dataset, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def build_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, device: torch.device | str = "cpu"
) -> torch.optim.Optimizer:
    """The optimiser of ``cfg.optimizer`` for ``params``, which will train on ``device``.

    ``fused: auto`` takes torch's fused implementation on a GPU: one kernel updates every parameter,
    where the default (foreach) launches about seven per step, and a small model's GPU step is bound
    by kernel launches. On the CPU ``auto`` keeps torch's default (a loop over the parameters), so CPU
    runs give the numbers they gave before the setting existed; there the fused Adam saved little
    (24.9 vs 26.7 ms per step of the default run's student at batch 128, 2 threads): ``true`` takes it."""
    o = cfg.optimizer
    fused = torch.device(device).type == "cuda" if o.fused == "auto" else bool(o.fused)
    kw: dict[str, Any] = {"fused": True} if fused else {}
    try:
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **kw)
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **kw)
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **kw)
    except (RuntimeError, TypeError) as e:  # this torch has no fused kernel for this optimiser or device
        if not kw:  # not about the fused kernel: torch's own error
            raise
        if o.fused == "auto":
            return build_optimizer(params, replace(cfg, optimizer=replace(o, fused=False)), device)
        raise ConfigError(
            f"optimizer.fused: true is not supported for {o.name} on {torch.device(device).type} by torch "
            f"{torch.__version__} ({e}); set fused: auto in that train.optimizer (train or teacher.train)"
        ) from None


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    s = cfg.scheduler
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    return None
