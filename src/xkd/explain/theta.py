"""MED-TEX's importance map Θ as an explanation (registry ``medtex_theta``).

Source: Nguyen-Duc, Zhao, Cai & Phung, "MED-TEX: Transfer and Explain Knowledge with Less Data from
Pretrained Medical Imaging Models", IEEE ISBI 2022, eq. 3: the
explainer ``E`` gives every pixel and channel an importance score ``Θ = E(X) ∈ [0, 1]^{C×H×W}`` and
the student sees ``Θ ⊙ X``. The paper ranks these scores to select the top-K pixels it compares with
lesion masks (eq. 14, top-K IoU/Dice in :mod:`xkd.metrics.localisation`).

The map of an image is ``Θ`` **averaged over its C channels**: ``(N, H, W)`` float32 at input
resolution, values in ``[0, 1]``, not otherwise normalised. It is class-agnostic (``targets`` is
ignored): Θ does not depend on a class. Only models that compute Θ can be explained this way, i.e.
the :class:`~xkd.distill.medtex.MaskedStudent` of the ``medtex`` and ``medex`` distillers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from xkd.errors import ConfigError, ThetaUnavailableError
from xkd.explain.base import Attribution, Explainer, check_inputs
from xkd.models.state import eval_mode, model_device
from xkd.registry import EXPLAINERS

THETA_DISTILLERS = ("medtex", "medex")


@EXPLAINERS.register("medtex_theta")
class MedTexTheta(Explainer):
    """MED-TEX's importance map Θ (eq. 3), averaged over channels.

    Raises:
        ThetaUnavailableError: at construction, when ``model`` has no ``theta(x)`` method.
    """

    @dataclass
    class Params:
        """Attributes:
        batch_size: images per forward pass of the explainer network (bounds memory).
        """

        batch_size: int = 64

        def validate(self) -> None:
            if self.batch_size < 1:
                raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def applies_to(cls, model: nn.Module) -> bool:
        return callable(getattr(model, "theta", None))

    def __init__(self, model: nn.Module, params: Any = None) -> None:
        super().__init__(model, params)
        if not self.applies_to(model):
            raise ThetaUnavailableError(
                f"medtex_theta explains MED-TEX's importance map Θ, which {type(model).__name__} does not compute "
                f"(no `theta(x)` method); only students trained with the distillers "
                f"{' or '.join(repr(n) for n in THETA_DISTILLERS)} have it (a teacher or another student does not)"
            )

    def explain(self, images: Tensor, targets: Tensor | None = None) -> Attribution:
        """``Θ(images)`` averaged over channels; ``targets`` is ignored (Θ is class-agnostic).

        Returns:
            :class:`Attribution` with float32 maps ``(N, H, W)`` in ``[0, 1]`` on ``images``' device.
        """
        check_inputs(images, targets)
        device = model_device(self.model, images.device)
        out = []
        with eval_mode(self.model), torch.no_grad():
            for start in range(0, images.shape[0], self.params.batch_size):
                chunk = images[start : start + self.params.batch_size].to(device)
                theta = self.model.theta(chunk)
                if theta.shape != chunk.shape:
                    raise ValueError(
                        f"theta(x) must have the shape of x {tuple(chunk.shape)}, got {tuple(theta.shape)}"
                    )
                out.append(theta.float().mean(dim=1).to(images.device))
        maps = torch.cat(out) if out else images.new_zeros((0, *images.shape[2:]), dtype=torch.float32)
        return Attribution(maps, method=self.registry_name, layer=None)
