"""The training engine: one trainer, safe checkpoints, torchrun support."""

from xkd.engine.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from xkd.engine.trainer import NonFiniteLossError, Trainer, TrainResult, evaluate_loss_accuracy

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "evaluate_loss_accuracy",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
]
