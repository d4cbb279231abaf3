"""Registered teachers and students, and import of any user ``nn.Module``.

Every builder has the signature ``builder(num_classes, in_channels, image_size, pretrained=False,
**params) -> nn.Module`` and sets ``num_classes`` and ``xkd_default_layer`` (the layer explainers use
by default) on the model. Stems are adapted for small grayscale images: the first convolution takes
``in_channels``, and below 64 px the stride-2 stem and its max-pool are replaced by a stride-1 3x3
conv so 28x28 inputs keep spatial extent through the network.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from xkd.config import ConfigError, ModelConfig
from xkd.errors import PretrainedUnavailableError
from xkd.registry import MODELS

SMALL_IMAGE = 64

ImageSize = int | tuple[int, int]


def _hw(image_size: ImageSize) -> tuple[int, int]:
    """``(H, W)`` of an ``image_size`` given as one side or as ``(H, W)``."""
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def _load_pretrained(builder: Callable[..., nn.Module], weights: Any, name: str) -> nn.Module:
    try:
        return builder(weights=weights)
    except Exception as e:  # network errors come in many types (URLError, OSError, HTTPError)
        raise PretrainedUnavailableError(
            f"pretrained weights for {name} could not be loaded ({type(e).__name__}: {e}). This machine "
            f"may have no internet access: set `pretrained: false` to train from scratch, or place the "
            f"weight file {weights.url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints"
        ) from None


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int, small: bool) -> nn.Conv2d:
    """A replacement stem conv for ``in_channels`` (pretrained RGB filters summed to grayscale)."""
    k, s, p = (3, 1, 1) if small else (conv.kernel_size, conv.stride, conv.padding)
    new = nn.Conv2d(in_channels, conv.out_channels, k, s, p, bias=conv.bias is not None)
    if not small:
        with torch.no_grad():
            if in_channels == conv.in_channels:
                new.weight.copy_(conv.weight)
            else:  # keep the response to a gray image: the summed filter spread over the new channels
                w = conv.weight.sum(dim=1, keepdim=True) / in_channels
                new.weight.copy_(w.expand(-1, in_channels, -1, -1))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    return new


def _finish(model: nn.Module, num_classes: int, layer: str) -> nn.Module:
    model.num_classes = num_classes
    model.xkd_default_layer = layer
    return model


@MODELS.register("densenet121")
def densenet121(
    num_classes: int, in_channels: int = 3, image_size: ImageSize = 224, pretrained: bool = False
) -> nn.Module:
    """DenseNet121 (Huang et al. 2017; the KD-FMV teacher), torchvision with ``weights=None`` unless
    ``pretrained``. Default explained layer: ``features.norm5``."""
    from torchvision.models import DenseNet121_Weights
    from torchvision.models import densenet121 as tv

    small = min(_hw(image_size)) < SMALL_IMAGE
    model = _load_pretrained(tv, DenseNet121_Weights.IMAGENET1K_V1, "densenet121") if pretrained else tv(weights=None)
    if small or in_channels != 3:
        model.features.conv0 = _adapt_first_conv(model.features.conv0, in_channels, small)
    if small:
        model.features.pool0 = nn.Identity()
    if model.classifier.out_features != num_classes:
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return _finish(model, num_classes, "features.norm5")


@MODELS.register("resnet18")
def resnet18(
    num_classes: int, in_channels: int = 3, image_size: ImageSize = 224, pretrained: bool = False
) -> nn.Module:
    """ResNet-18 (He et al. 2016), torchvision. Default explained layer: ``layer4``."""
    from torchvision.models import ResNet18_Weights
    from torchvision.models import resnet18 as tv

    small = min(_hw(image_size)) < SMALL_IMAGE
    model = _load_pretrained(tv, ResNet18_Weights.IMAGENET1K_V1, "resnet18") if pretrained else tv(weights=None)
    if small or in_channels != 3:
        model.conv1 = _adapt_first_conv(model.conv1, in_channels, small)
    if small:
        model.maxpool = nn.Identity()
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return _finish(model, num_classes, "layer4")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, §4.2): a 3x3 stem and three stages of ``(depth-2)/6``
    basic blocks with ``width``, ``2 width``, ``4 width`` channels; global average pool; linear."""

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 20, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ConfigError(f"cifar_resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width]):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@MODELS.register("cifar_resnet")
def cifar_resnet(
    num_classes: int,
    in_channels: int = 3,
    image_size: ImageSize = 32,
    pretrained: bool = False,
    depth: int = 20,
    width: int = 16,
) -> nn.Module:
    """CIFAR-style ResNet-``depth`` (default ResNet-20, 0.27 M parameters at width 16).
    Default explained layer: ``layer3``."""
    if pretrained:
        raise PretrainedUnavailableError("cifar_resnet has no pretrained weights; set `pretrained: false`")
    return _finish(CifarResNet(num_classes, in_channels, depth, width), num_classes, "layer3")


class KDFMVStudent(nn.Module):
    """The KD-FMV student (Jiang et al., arXiv 2025): five blocks of 3x3 conv -> ReLU -> 2x2 max-pool with
    ``widths`` filters (paper: 32, 64, 128, 256, 512), flatten, linear.

    Pools use ``ceil_mode`` so inputs smaller than 32 px (28x28 -> 14, 7, 4, 2, 1) still work.
    """

    def __init__(
        self, num_classes: int, in_channels: int, image_size: ImageSize, widths: Sequence[int], batch_norm: bool = False
    ) -> None:
        super().__init__()
        (h, w), blocks, cin = _hw(image_size), [], in_channels
        for width in widths:
            norm = [nn.BatchNorm2d(width)] if batch_norm else []
            blocks.append(
                nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))
            )
            cin, h, w = width, math.ceil(h / 2), math.ceil(w / 2)
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.blocks(x), 1))


@MODELS.register("kdfmv_cnn")
def kdfmv_cnn(
    num_classes: int,
    in_channels: int = 3,
    image_size: ImageSize = 224,
    pretrained: bool = False,
    widths: Sequence[int] = (32, 64, 128, 256, 512),
    batch_norm: bool = False,
) -> nn.Module:
    """The KD-FMV 5-block student CNN; ``widths`` sets the number and width of blocks.

    ``batch_norm`` adds a BatchNorm after each convolution (not in KD-FMV; MED-TEX's students use
    conv-BN blocks). Without it the plain student stayed at chance on the ``lesions`` set in 8
    epochs (lr 2e-3 and 5e-3).

    Default explained layer: the last conv block's ReLU output (``blocks.<n-1>.1``, or ``.2`` with
    BatchNorm), i.e. the last conv layer as KD-FMV's Keras layers see it, activation included. The
    pre-activation conv output can rank the evidence last: on ``lesions`` a BatchNorm student's
    pre-activation average feature map pointed at the lesion in 0% of images (its negation in 70%),
    its ReLU output in 58%.
    """
    if pretrained:
        raise PretrainedUnavailableError("kdfmv_cnn has no pretrained weights; set `pretrained: false`")
    widths = list(widths)
    if not widths or any(int(w) < 1 for w in widths):
        raise ConfigError(f"kdfmv_cnn widths must be positive integers, got {widths}")
    return _finish(
        KDFMVStudent(num_classes, in_channels, image_size, widths, batch_norm),
        num_classes,
        f"blocks.{len(widths) - 1}.{2 if batch_norm else 1}",
    )


def _import_object(path: str) -> Any:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"cannot import model {path!r} ({e}); give a registered name ({', '.join(MODELS.names())}) "
            "or an importable path like 'mypackage.models:MyNet'"
        ) from None


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: ImageSize) -> nn.Module:
    """Build ``cfg.name`` (a registered model or a dotted import path) for the dataset's shape.

    A user class or function receives ``num_classes``, ``in_channels`` and ``image_size`` if its
    signature has them, plus ``cfg.params``. ``image_size`` is one int for square images and
    ``(H, W)`` otherwise.

    Raises:
        ConfigError: unknown name or parameter (the message lists the accepted ones).
        PretrainedUnavailableError: ``pretrained`` asked for and weights unavailable.
    """
    if cfg.name in MODELS:
        builder = MODELS.get(cfg.name)
        fixed = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "image_size": image_size,
            "pretrained": cfg.pretrained,
        }
    elif ":" in cfg.name or "." in cfg.name:
        builder = _import_object(cfg.name)
        fixed = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
        if cfg.pretrained:
            fixed["pretrained"] = True
    else:
        MODELS.get(cfg.name)  # raises with the registered names
        raise AssertionError
    sig = inspect.signature(builder)
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [n for n in sig.parameters if n not in ("self", "num_classes", "in_channels", "image_size", "pretrained")]
    for k in cfg.params:
        if k in fixed or (not accepts_any and k not in sig.parameters):
            raise ConfigError(f"model {cfg.name!r} has no parameter {k!r}; accepted: {', '.join(allowed) or 'none'}")
    kwargs = {k: v for k, v in fixed.items() if accepts_any or k in sig.parameters}
    if cfg.pretrained and "pretrained" not in kwargs:
        raise ConfigError(f"model {cfg.name!r} does not take `pretrained`; set it to false")
    model = builder(**kwargs, **cfg.params)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {cfg.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    if not hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
