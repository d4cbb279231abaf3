"""The Grad-CAM family over a small class-activation-map template: Grad-CAM (Selvaraju et al., ICCV
2017; registry ``grad_cam``), Grad-CAM++ (Chattopadhay et al., WACV 2018, eq. 19; ``grad_cam_pp``) and
LayerCAM (Jiang et al., IEEE TIP 2021; ``layer_cam``).

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

Speed, measured with ``bench/gradcam_bench.py`` on this machine (2 CPU cores shared with other jobs,
load ~3; 2 torch threads; torch 2.14.1, captum 0.9, grad-cam 1.5.7): one batch of 64 random images,
untrained models in eval mode, the model's default layer, median of interleaved repeats (7 for the
28x28 cases, 3 for resnet18), milliseconds per batch. LIMIT = one forward pass with autograd plus the
backward of the selected logits' sum to the input (pgc = pytorch-grad-cam):

==============================  =======================  ===================  =================  =======  =====
model (layer), input            grad_cam xkd/captum/pgc  grad_cam_pp xkd/pgc  layer_cam xkd/pgc  forward  LIMIT
==============================  =======================  ===================  =================  =======  =====
cifar_resnet (layer3) 1x28x28   54.6 / 55.8 / 161        50.7 / 158           52.5 / 162         49.3     107
kdfmv_cnn (blocks.4.1) 1x28x28  38.6 / 39.6 / 99.1       39.3 / 97.9          37.8 / 96.1        36.2     62.8
resnet18 (layer4) 3x64x64       230 / 226 / 684          222 / 709            258 / 711          214      444
==============================  =======================  ===================  =================  =======  =====

xkd/fastest other = 0.98-1.02 for Grad-CAM (captum), 0.31-0.40 for Grad-CAM++ and 0.32-0.39 for LayerCAM
(pytorch-grad-cam); xkd/LIMIT = 0.47-0.63 and xkd/forward = 1.03-1.20 for all three. The ``xkd`` and
``captum`` Grad-CAM maps are identical (max abs difference 0); pytorch-grad-cam agrees to 1e-5 after
min-max normalisation for Grad-CAM and LayerCAM (1e-2 to 1e-1 for Grad-CAM++: its eps, see
:class:`GradCAMPlusPlus`). Absolute times move by up to ~30 % with the machine's load, the ratios do
not. The own backend is the default: it costs about one plain no-grad forward pass, which is the floor
for a last-layer CAM; pytorch-grad-cam takes ~3x as long (it back-propagates into the whole network and
fills ``parameter.grad``). ``backend="captum"`` (Grad-CAM only) runs ``captum.attr.LayerGradCam`` +
``LayerAttribution.interpolate(..., "bilinear")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.errors import ConfigError
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
            (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), store["a"], allow_unused=True)
        if grads is None:
            raise ValueError(
                f"layer {self.layer!r} does not feed the logits of {type(self.model).__name__} (its output is not used "
                "on the way to them), so it has no class activation map; name a layer the logits depend on"
            )
        return store["a"].detach(), grads

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class CAMParams:
    """Options shared by the CAM explainers.

    Attributes:
        layer: module path of the explained layer (None: the model's default layer, usually the
            last convolution).
        batch_size: images per forward/backward pass (bounds memory).
        relu: apply the final ReLU (keep only evidence for the class).
    """

    layer: str | None = None
    batch_size: int = 256
    relu: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.layer is not None and not self.layer:
            raise ConfigError("layer must be a module path or null, got ''")


@EXPLAINERS.register("grad_cam")
class GradCAM(CAMExplainer):
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2): channel weights are the spatial mean of the
    gradient of the class logit; ``ReLU(sum_k w_k A^k)`` upsampled to the input.

    Example:
        >>> with GradCAM(model, {"layer": "layer3"}) as gc:
        ...     attribution = gc.explain(images, labels)
    """

    @dataclass
    class Params(CAMParams):
        """Grad-CAM options: ``layer``, ``batch_size``, ``relu`` (the ReLU of eq. 2) as in
        :class:`CAMParams`, and ``backend``: ``"xkd"`` (own implementation, the faster) or
        ``"captum"`` (LayerGradCam)."""

        backend: Literal["xkd", "captum"] = "xkd"

        def validate(self) -> None:
            super().validate()
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


@EXPLAINERS.register("grad_cam_pp")
class GradCAMPlusPlus(CAMExplainer):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018), channel weights of eq. 19 in the closed form for
    an exponential score ``Y = exp(S)`` (eq. 17-19; the form pytorch-grad-cam and the authors use),
    with ``g = dS/dA^k_ij`` the gradient of the class logit::

        alpha^k_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3)      (0 where the denominator is 0)
        w_k        = sum_ij alpha^k_ij ReLU(g)
        L          = ReLU(sum_k w_k A^k)

    pytorch-grad-cam adds ``eps = 1e-6`` to the denominator; xkd does not (it would bias ``alpha``
    wherever ``g^2`` is not >> 1e-6, i.e. for the small gradients of wide layers), and sets ``alpha = 0``
    only where the denominator is exactly 0 (pytorch-grad-cam: where ``g = 0``, which is the same set
    except for the measure-zero case ``sum A * g = -2``).
    """

    Params = CAMParams

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        # alpha * ReLU(g) = g^2 ReLU(g) / (g^2 (2 + S g)) = ReLU(g) / (2 + S g), S = sum_ab A_ab: the g^2
        # cancels (0 where 2 + S g = 0, where eq. 19's denominator is 0 too; where g = 0, ReLU(g) = 0).
        # 8 element-wise kernels instead of 15 (the GPU run measured Grad-CAM++ on the KD-FMV student at
        # 1.43x one forward+backward), and no g^3, which under- and overflows in float32 first.
        d = (activations.sum(dim=(2, 3), keepdim=True) * gradients).add_(2.0)
        ratio = F.relu(gradients) / d
        return torch.where(d != 0, ratio, 0.0).sum(dim=(2, 3), keepdim=True)


@EXPLAINERS.register("layer_cam")
class LayerCAM(CAMExplainer):
    """LayerCAM (Jiang et al., IEEE TIP 2021, eq. 5-6): every position gets its own weight, the
    positive part of the gradient of the class logit, instead of a spatially averaged one::

        L = ReLU(sum_k ReLU(g^k_ij) * A^k_ij)

    so it is not "channel weights times A": :meth:`_explain_chunk` is overridden.
    """

    Params = CAMParams

    def _explain_chunk(self, images: Tensor, targets: Tensor | None) -> Tensor:
        acts, grads = self._activations_and_gradients(images, targets)
        cam = (F.relu(grads) * acts).sum(dim=1, keepdim=True)
        return self._finish(cam, images.shape[2:])
