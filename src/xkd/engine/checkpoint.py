"""Checkpoints that never unpickle arbitrary objects.

A checkpoint is a dict of tensors, numbers and strings saved with :func:`torch.save` and read back
with ``torch.load(weights_only=True)``; JSON-able extras (history) are stored as a JSON string.
Writes are atomic, so an interrupted save never corrupts the last good checkpoint.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xkd.errors import CheckpointError
from xkd.files import atomic_write_bytes

FORMAT = "xkd-checkpoint-v1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    payload = dict(state)
    payload["format"] = FORMAT
    if "history" in payload:
        payload["history"] = json.dumps(payload["history"])
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read safely ({type(e).__name__}: {e}); xkd only loads "
            "tensor-only checkpoints (torch.load weights_only=True). Re-create it with xkd."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not an xkd checkpoint")
    if "format" not in state:  # a bare state dict from elsewhere
        state = {"model": state, "format": "state_dict"}
    if isinstance(state.get("history"), str):
        state["history"] = json.loads(state["history"])
    return state


def load_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module`` after checking it matches key for key and shape for shape.

    Raises:
        CheckpointError: naming missing/unexpected keys and mismatched shapes, so a checkpoint of
            another architecture is refused with a readable reason instead of a partial load.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        raise CheckpointError(
            f"checkpoint {source} was saved from a different architecture than {type(module).__name__}: "
            f"{'; '.join(parts)}. Use the model config the checkpoint was trained with, or retrain."
        )
    module.load_state_dict(state_dict)


def model_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The bare model weights in a loaded checkpoint.

    xkd's trainer checkpoints the distiller's trainable modules, so the model being trained sits
    under ``student.``; a bare ``state_dict`` from elsewhere is returned as it is.
    """
    weights = state["model"]
    if state.get("format") != FORMAT:
        return weights
    return {k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")}
