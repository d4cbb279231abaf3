"""The generated lesions set: deterministic, balanced, and its masks are exactly the lesion."""

from __future__ import annotations

import pytest
import torch

from xkd.config import DataConfig
from xkd.data import DataError, build_dataset, generate_lesions


def test_deterministic_from_the_seed():
    a = generate_lesions(num_per_class=20, size=32, seed=5)
    b = generate_lesions(num_per_class=20, size=32, seed=5)
    c = generate_lesions(num_per_class=20, size=32, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_shapes_balance_and_masks():
    images, labels, masks = generate_lesions(num_per_class=25, size=64, seed=0)
    assert images.shape == (100, 1, 64, 64) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [25] * 4
    area = masks.flatten(1).sum(1)
    assert int(area.min()) > 0 and int(area.max()) < 64 * 64 * 0.05  # a small lesion in every image


def test_mask_is_exactly_where_the_lesion_changes_the_image():
    images, _, masks, background = generate_lesions(num_per_class=10, size=48, seed=1, return_background=True)
    differs = images[:, 0] != background[:, 0]
    assert not differs[~masks].any()  # nothing outside the mask is the lesion
    assert differs[masks].float().mean() > 0.9  # the mask's pixels are changed by the lesion


def test_distractors_do_not_predict_the_class():
    """The lesion-free images carry no label: their class means are indistinguishable."""
    _, labels, _, background = generate_lesions(num_per_class=150, size=32, seed=2, return_background=True)
    means = torch.stack([background[labels == k].float().mean() for k in range(4)])
    assert float(means.max() - means.min()) < 2.0  # on a 0..255 scale


def test_registered_builder_with_params():
    data = build_dataset(DataConfig("lesions", params={"num_per_class": 30, "size": 32}))
    assert data.has_masks and data.image_shape == (1, 32, 32) and data.class_names[0] == "round"
    img, label, mask = data.test[0]
    assert mask.shape == (32, 32) and mask.dtype == torch.bool and mask.any()
    with pytest.raises(DataError, match="data.params.sise is not a parameter"):
        build_dataset(DataConfig("lesions", params={"sise": 32}))
