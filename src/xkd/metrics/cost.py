"""Cost of a model and of explaining it: parameters, FLOPs per image, and the mean execution time
(MET) per image of an explainer (KD-FMV: Jiang, Zhao, Wu & Chaddad, "A Knowledge Distillation-Based
Approach to Enhance Transparency of Classifier Models", arXiv 2025)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from xkd.metrics.base import metric
from xkd.models.state import eval_mode, model_device


@metric("params", scope="test", inputs=("model",), higher_is_better=False, category="cost", label="Parameters")
def parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@metric("flops", scope="test", inputs=("model", "image_shape"), higher_is_better=False, category="cost", label="FLOPs")
def flops(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """Floating-point operations of one forward pass on one image of shape ``(C, H, W)``.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts **2 FLOPs per
    multiply-add** of the matrix products and convolutions it has formulas for (``mm``, ``addmm``,
    ``bmm``, convolutions, attention); element-wise operations (bias-free activations, batch norm,
    pooling, additions) and the bias add of ``addmm`` are not counted. A ``Linear(10, 5)`` is
    therefore ``2 * 10 * 5 = 100`` FLOPs, i.e. 50 multiply-accumulates (MACs). Papers often quote
    MACs under the name FLOPs; compare with ``macs`` where a paper says it counts MACs.

    KD-FMV's cost table gives "FLOPS (x 10^6)" of 566.89 for its DenseNet121 teacher and 232.70 for
    its 5-block student, without saying whether these count FLOPs or MACs, nor at which input size.
    They are not xkd's counts of those models at 224 x 224 x 3 (4 classes) under either convention:
    ``densenet121`` is 2,833.1 M MACs (5,666.3 M FLOPs) and ``kdfmv_cnn`` (widths 32..512) 968.3 M
    MACs (1,936.6 M FLOPs); the paper's teacher/student ratio is 2.44, xkd's 2.93 (the same for MACs
    and FLOPs). Compare models by xkd's own counts, not against the paper's numbers.

    The model runs in eval mode without gradients; its train/eval flags are restored.

    Returns:
        ``{"flops": int, "macs": int, "input_shape": [C, H, W], "per_op": {op: flops}}``.
    """
    shape = [int(s) for s in input_shape]
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    x = torch.zeros(1, *shape, device=model_device(model, torch.device("cpu")))
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    total = int(counter.get_total_flops())
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": total, "macs": total // 2, "input_shape": shape, "per_op": per_op}


def _sync(images: Tensor) -> None:
    if images.is_cuda:
        torch.cuda.synchronize(images.device)


def check_repeats(repeats: int) -> None:
    """The number of timed repeats of :func:`mean_explain_time`, checked."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")


@metric(
    "met",
    scope="timing",
    inputs=("explainer", "images", "labels"),
    higher_is_better=False,
    category="cost",
    label="MET",
    default=True,
    subset="met_images",
    check=check_repeats,
)
def mean_explain_time(
    explainer: Callable[[Tensor, Tensor], Any],
    images: Tensor,
    targets: Tensor,
    repeats: int = 1,
    warmup: bool = True,
) -> float:
    """Mean execution time (MET, KD-FMV) of ``explainer`` in seconds per image.

    Wall-clock time (``time.perf_counter``) of ``repeats`` calls of ``explainer(images, targets)``
    divided by ``repeats * N``. With ``warmup``, one untimed call on the first two images comes first
    (first four images; it pays one-off costs such as allocator growth and lazy initialisation).
    """
    if images.shape[0] == 0:
        raise ValueError("mean_explain_time needs at least one image")
    check_repeats(repeats)
    if warmup:
        explainer(images[:4], targets[:4])  # UniCAM needs a batch of at least 4
    _sync(images)
    start = time.perf_counter()
    for _ in range(repeats):
        explainer(images, targets)
    _sync(images)
    return (time.perf_counter() - start) / (repeats * images.shape[0])
