"""The training engine: one trainer, safe checkpoints, torchrun support."""

from xkd.engine.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from xkd.engine.trainer import NonFiniteLossError, Trainer, TrainResult

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
]
