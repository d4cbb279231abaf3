"""Parameters, FLOPs and mean explanation time."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from xkd.metrics import flops, mean_explain_time, parameter_count


def test_params_of_known_models():
    assert parameter_count(nn.Linear(10, 5)) == 55
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))  # 2*9 + 2 = 20; 8*3 + 3 = 27
    assert parameter_count(model) == 47
    model[0].requires_grad_(False)
    assert parameter_count(model, trainable_only=True) == 27
    shared = nn.Linear(4, 4)
    assert parameter_count(nn.Sequential(shared, shared)) == 20


def test_flops_count_two_per_multiply_add():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(10, 5))
    out = flops(lin, (1, 1, 10))
    assert out["flops"] == 2 * 10 * 5 == 100 and out["macs"] == 50
    # 3x3 conv, 1 -> 2 channels, on a padded 4x4 image: 2 * 16 * 9 = 288 MACs
    conv = nn.Conv2d(1, 2, 3, padding=1)
    conv.train()
    out = flops(conv, (1, 4, 4))
    assert (out["flops"], out["macs"], out["input_shape"]) == (576, 288, [1, 4, 4])
    assert conv.training
    with pytest.raises(ValueError, match="C, H, W"):
        flops(conv, (4, 4))


def test_mean_explain_time_per_image():
    calls: list[int] = []

    def slow_explainer(images: torch.Tensor, targets: torch.Tensor) -> None:
        calls.append(images.shape[0])
        time.sleep(0.02)

    images, targets = torch.zeros(6, 1, 2, 2), torch.zeros(6, dtype=torch.long)
    t = mean_explain_time(slow_explainer, images, targets, repeats=2)
    assert calls == [4, 6, 6]  # the warm-up call on four images is not timed
    assert 0.02 / 6 <= t < 0.02
    calls.clear()
    mean_explain_time(slow_explainer, images, targets, warmup=False)
    assert calls == [6]


def test_flops_docstring_states_xkds_counts_of_the_kdfmv_models_at_224():
    """The cost docstring's numbers for KD-FMV's teacher and student at 224 x 224 x 3 are xkd's own
    counts (issue 13, finding 11: the paper's 566.89 M / 232.70 M are not MACs at 224^2)."""
    from xkd.models.zoo import densenet121, kdfmv_cnn

    # the student by hand: five 3x3 convs (padding 1) each followed by a 2x2 max-pool, then a linear layer
    macs, c_in, side = 0, 3, 224
    for c_out in (32, 64, 128, 256, 512):
        macs += side * side * c_out * c_in * 9
        c_in, side = c_out, side // 2
    macs += c_in * side * side * 4  # 512 * 7 * 7 -> 4 classes
    student = flops(kdfmv_cnn(4), (3, 224, 224))
    assert student["macs"] == macs == 968_296_448
    teacher = flops(densenet121(4), (3, 224, 224))
    doc = " ".join(flops.__doc__.split())  # as one line
    for out in (teacher, student):
        assert f"{out['macs'] / 1e6:,.1f} M MACs" in doc and f"{out['flops'] / 1e6:,.1f} M FLOPs" in doc, out
    assert f"{teacher['macs'] / student['macs']:.2f}" in doc and f"{566.89 / 232.70:.2f}" in doc
    assert "566.89 M / 232.70 M at 224^2" not in doc
