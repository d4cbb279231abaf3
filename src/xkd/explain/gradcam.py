"""Grad-CAM (Selvaraju et al., ICCV 2017) over a small class-activation-map template.

Grad-CAM for class ``c`` at a convolutional layer with activations ``A^k`` (eq. 1-2)::

    w_k^c = 1/Z sum_ij d y^c / d A^k_ij          (eq. 1: spatial mean of the gradient)
    L^c   = ReLU(sum_k w_k^c A^k)                 (eq. 2)

``L^c`` is upsampled bilinearly (``align_corners=False``) to the input resolution. Maps are not
normalised (use :func:`xkd.explain.base.normalize_maps`).

:class:`CAMExplainer` is the template (the pytorch-grad-cam pattern): one forward pass with a hook on
the layer, one ``torch.autograd.grad`` of the selected logits' sum with respect to the layer's
output, then ``sum_k w_k A^k``; a subclass only says how the channel weights ``w_k`` are computed.
Images of a batch are independent because the model is explained in eval mode, so the gradient of
the summed logits gives every image its own gradient. ``torch.autograd.grad`` never touches
``parameter.grad``. The part of the network before the layer runs without autograd (nothing before
the layer can depend on its output, so the gradient is exact); the layer's output is cloned before
the rest of the network sees it, so in-place operations after it (``ReLU(inplace=True)``) do not
corrupt the activations.

Backends, measured with ``bench/gradcam_bench.py`` on this machine (2 CPU cores shared with other
jobs, load ~1.5; 2 torch threads; torch 2.14.1, captum 0.9, grad-cam 1.5.7): one batch of 64 random
images, untrained models in eval mode, the model's default layer, median of interleaved repeats
(15 for the 28x28 cases, 5 for resnet18), milliseconds per batch (ratio = xkd / captum):

================================  ======  ======  ======  ================  =======
model (layer), input              xkd     captum  ratio   pytorch-grad-cam  forward
================================  ======  ======  ======  ================  =======
cifar_resnet (layer3), 1x28x28    66.0    71.2    0.93    209               63.6
kdfmv_cnn (blocks.4.0), 1x28x28   61.9    62.2    1.00    165               58.8
resnet18 (layer4), 3x64x64        343     346     0.99    1095              340
================================  ======  ======  ======  ================  =======

The ``xkd`` and ``captum`` maps are identical (max abs difference 0); pytorch-grad-cam agrees to
1e-5 after min-max normalisation. Absolute times move by up to ~30 % with the machine's load, the
ratios do not. The own backend is the default: it is never slower than captum (0.93-1.00) and costs
about one plain no-grad forward pass (1.01-1.05x), which is the floor for a last-layer Grad-CAM;
pytorch-grad-cam takes ~3x as long (it back-propagates into the whole network and fills
``parameter.grad``). ``backend="captum"`` runs ``captum.attr.LayerGradCam`` +
``LayerAttribution.interpolate(..., "bilinear")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.config import ConfigError
from xkd.explain.base import Attribution, Explainer, check_inputs
from xkd.models.hooks import default_layer, get_module
from xkd.models.state import eval_mode, model_device
from xkd.registry import EXPLAINERS


class CAMExplainer(Explainer):
    """Template of gradient-weighted class activation maps.

    Subclasses define ``Params`` (with ``layer``, ``batch_size`` and ``relu``) and
    :meth:`channel_weights`. The hook lives only for the duration of one chunk's forward pass.
    """

    def __init__(self, model: nn.Module, params: Any = None) -> None:
        super().__init__(model, params)
        self.layer = self.params.layer if self.params.layer is not None else default_layer(model)
        self.module = get_module(model, self.layer)  # unknown layer -> LayerNotFoundError
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        """Weights ``(N, K, 1, 1)`` of the layer's channels, from activations and gradients ``(N, K, h, w)``."""
        raise NotImplementedError

    def explain(self, images: Tensor, targets: Tensor | None) -> Attribution:
        """Maps for ``targets`` (class indices, shape ``(N,)``; None explains the predicted class).

        Returns:
            :class:`Attribution` with float32 maps ``(N, H, W)`` on ``images``' device.
        """
        check_inputs(images, targets)
        device = model_device(self.model, images.device)
        out = []
        with eval_mode(self.model):
            for start in range(0, images.shape[0], self.params.batch_size):
                chunk = images[start : start + self.params.batch_size].to(device)
                tgt = None if targets is None else targets[start : start + self.params.batch_size].to(device).long()
                cam = self._explain_chunk(chunk, tgt)
                out.append(cam.detach().float().to(images.device))
        maps = torch.cat(out) if out else images.new_zeros((0, *images.shape[2:]), dtype=torch.float32)
        return Attribution(maps, method=self.registry_name, layer=self.layer)

    def _explain_chunk(self, images: Tensor, targets: Tensor | None) -> Tensor:
        acts, grads = self._activations_and_gradients(images, targets)
        cam = (self.channel_weights(acts, grads) * acts).sum(dim=1, keepdim=True)
        return self._finish(cam, images.shape[2:])

    def _finish(self, cam: Tensor, size: torch.Size) -> Tensor:
        if self.params.relu:
            cam = F.relu(cam)
        return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]

    def _activations_and_gradients(self, images: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        store: dict[str, Tensor] = {}

        def hook(_module: nn.Module, _inputs: object, output: object) -> Tensor:
            if not isinstance(output, Tensor) or output.ndim != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(f"layer {self.layer!r} must output an (N, K, h, w) tensor for a CAM, got {shape}")
            leaf = output.detach().requires_grad_(True)
            store["a"] = leaf  # the last call wins if the module is used twice
            torch.set_grad_enabled(True)  # the rest of the forward pass is recorded
            return leaf.clone()

        handle = self.module.register_forward_hook(hook)
        self._handles.append(handle)
        grad_mode = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            logits = self.model(images)
        finally:
            torch.set_grad_enabled(grad_mode)
            handle.remove()
            self._handles.remove(handle)
        if "a" not in store:
            raise RuntimeError(
                f"layer {self.layer!r} was not called in the forward pass of {type(self.model).__name__}"
            )
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise ValueError(f"model must return logits of shape (N, classes), got {type(logits).__name__}")
        if targets is None:
            targets = logits.argmax(dim=1)
        with torch.enable_grad():
            (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), store["a"])
        return store["a"].detach(), grads

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@EXPLAINERS.register("grad_cam")
class GradCAM(CAMExplainer):
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2): channel weights are the spatial mean of the
    gradient of the class logit; ``ReLU(sum_k w_k A^k)`` upsampled to the input.

    Example:
        >>> with GradCAM(model, {"layer": "layer3"}) as gc:
        ...     attribution = gc.explain(images, labels)
    """

    @dataclass
    class Params:
        """Grad-CAM options.

        Attributes:
            layer: module path of the explained layer (None: the model's default layer, usually the
                last convolution).
            batch_size: images per forward/backward pass (bounds memory).
            relu: apply the ReLU of eq. 2 (keep only evidence for the class).
            backend: ``"xkd"`` (own implementation, the faster) or ``"captum"`` (LayerGradCam).
        """

        layer: str | None = None
        batch_size: int = 64
        relu: bool = True
        backend: Literal["xkd", "captum"] = "xkd"

        def validate(self) -> None:
            if self.batch_size < 1:
                raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
            if self.layer is not None and not self.layer:
                raise ConfigError("layer must be a module path or null, got ''")
            if self.backend not in ("xkd", "captum"):
                raise ConfigError(f"backend {self.backend!r} is not allowed; allowed values: 'xkd', 'captum'")

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return gradients.mean(dim=(2, 3), keepdim=True)

    def _explain_chunk(self, images: Tensor, targets: Tensor | None) -> Tensor:
        if self.params.backend == "xkd":
            return super()._explain_chunk(images, targets)
        from captum.attr import LayerAttribution, LayerGradCam

        if targets is None:
            with torch.no_grad():
                targets = self.model(images).argmax(dim=1)
        with torch.enable_grad():
            cam = LayerGradCam(self.model, self.module).attribute(
                images.detach(), target=targets, relu_attributions=self.params.relu
            )
        cam = LayerAttribution.interpolate(cam.detach(), tuple(images.shape[2:]), interpolate_mode="bilinear")
        return cam[:, 0]
