"""Distillers: one class per method, registered by name."""

from xkd.distill.base import Distiller, build_distiller, distiller_params
from xkd.distill.logits import HintonKD, LabelSmoothing, Scratch, kd_loss

__all__ = ["Distiller", "HintonKD", "LabelSmoothing", "Scratch", "build_distiller", "distiller_params", "kd_loss"]
