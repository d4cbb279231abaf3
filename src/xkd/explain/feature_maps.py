"""Average feature maps per layer (KD-FMV: Jiang, Zhao, Wu & Chaddad, arXiv 2025).

For a layer with feature maps ``F_k`` (k = 1..K channels) the average feature map is::

    A(i, j) = 1/K sum_k F_k(i, j)

the **mean** over channels. The KD-FMV paper's text writes a sum; its code and the method's name
use the mean, and so does xkd (the two differ only by the factor K, which the explicit
normalisation step removes anyway). Each map is upsampled bilinearly (``align_corners=False``) to
the input resolution. One map per layer, shown from shallow to deep, for teacher and student.

Every layer's map comes from one forward pass per chunk of ``batch_size`` images, without autograd.
The hooks reduce each layer's output to its channel mean as soon as it is produced, so memory holds
one ``(N, 1, h, w)`` map per layer rather than every layer's full ``(N, K, h, w)`` output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.errors import ConfigError
from xkd.explain.base import Attribution, Explainer, check_inputs
from xkd.models.hooks import LayerNotFoundError, capture_features, conv_layer_paths, default_layer, get_module
from xkd.models.state import eval_mode, model_device
from xkd.registry import EXPLAINERS


def channel_mean(name: str, output: Tensor) -> Tensor:
    """The average feature map ``(N, 1, h, w)`` of one layer's output ``(N, K, h, w)``."""
    if not isinstance(output, Tensor) or output.ndim != 4:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"layer {name!r} must output an (N, K, h, w) tensor for a feature map, got {shape}")
    return output.mean(dim=1, keepdim=True)


@EXPLAINERS.register("feature_maps")
class FeatureMaps(Explainer):
    """KD-FMV average feature map ``A = mean_k F_k`` per layer, upsampled to the input.

    :meth:`explain` returns the map of ``params.layer`` and ignores ``targets`` (the map is
    class-agnostic; the argument keeps the common explainer signature). :meth:`explain_layers`
    returns one :class:`Attribution` per layer of ``params.layers``, in order, from one forward pass.
    """

    @dataclass
    class Params:
        """Average-feature-map options.

        Attributes:
            layers: module paths for :meth:`FeatureMaps.explain_layers` (None: every ``nn.Conv2d``,
                shallow to deep).
            batch_size: images per forward pass (bounds memory).
            layer: the layer whose map :meth:`FeatureMaps.explain` returns (None: the model's default
                layer, usually the last convolution).
        """

        layers: list[str] | None = None
        batch_size: int = 64
        layer: str | None = None

        def validate(self) -> None:
            if self.batch_size < 1:
                raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
            if self.layers is not None and (not self.layers or not all(self.layers)):
                raise ConfigError(f"layers must be a non-empty list of module paths or null, got {self.layers}")
            if self.layer is not None and not self.layer:
                raise ConfigError("layer must be a module path or null, got ''")

    def __init__(self, model: nn.Module, params: Any = None) -> None:
        super().__init__(model, params)
        self.layer = self.params.layer if self.params.layer is not None else default_layer(model)
        self.layers = list(self.params.layers) if self.params.layers is not None else conv_layer_paths(model)
        if not self.layers:
            raise LayerNotFoundError(f"{type(model).__name__} has no Conv2d layer; set `layers` explicitly")
        for p in [self.layer, *self.layers]:
            get_module(model, p)  # unknown layer -> LayerNotFoundError listing candidates

    def explain(self, images: Tensor, targets: Tensor | None = None) -> Attribution:
        """The average feature map of ``params.layer``; ``targets`` is ignored.

        Returns:
            :class:`Attribution` with float32 maps ``(N, H, W)`` on ``images``' device.
        """
        return self._maps(images, [self.layer])[0]

    def explain_layers(self, images: Tensor) -> list[Attribution]:
        """One :class:`Attribution` per layer of ``params.layers`` (shallow to deep by default)."""
        return self._maps(images, self.layers)

    def _maps(self, images: Tensor, paths: list[str]) -> list[Attribution]:
        check_inputs(images, None)
        device = model_device(self.model, images.device)
        size = tuple(images.shape[2:])
        chunks: list[list[Tensor]] = [[] for _ in paths]
        with (
            eval_mode(self.model),
            torch.no_grad(),
            capture_features(self.model, paths, detach=True, reduce=channel_mean) as feats,
        ):
            for start in range(0, images.shape[0], self.params.batch_size):
                feats.clear()
                self.model(images[start : start + self.params.batch_size].to(device))
                for out, p in zip(chunks, paths):
                    if p not in feats:
                        raise RuntimeError(
                            f"layer {p!r} was not called in the forward pass of {type(self.model).__name__}"
                        )
                    up = F.interpolate(feats[p].float(), size=size, mode="bilinear", align_corners=False)
                    out.append(up[:, 0].to(images.device))
        empty = images.new_zeros((0, *size), dtype=torch.float32)
        return [
            Attribution(torch.cat(c) if c else empty, method=self.registry_name, layer=p) for c, p in zip(chunks, paths)
        ]
