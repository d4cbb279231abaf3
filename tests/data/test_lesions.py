"""The generated lesions set: deterministic, balanced, and its masks are exactly the lesion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xkd.config import DataConfig
from xkd.data import DataError, build_dataset, generate_lesions
from xkd.data.lesions import _sample


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


# ----------------------------------------------------------------------------------------------
# splits, exact geometry of lesion and distractors, parameters, speed


def test_builder_splits_are_stratified_and_seeded():
    cfg = DataConfig("lesions", seed=4, params={"num_per_class": 50, "size": 32})
    data = build_dataset(cfg)
    assert (len(data.train), len(data.val), len(data.test)) == (140, 40, 20)
    for ds, per_class in ((data.train, 35), (data.val, 10), (data.test, 5)):
        assert torch.bincount(ds.labels).tolist() == [per_class] * 4
        assert ds.masks.shape == (len(ds), 32, 32) and bool(ds.masks.flatten(1).any(1).all())
    assert torch.equal(build_dataset(cfg).train.images, data.train.images)
    other = build_dataset(DataConfig("lesions", seed=5, params={"num_per_class": 50, "size": 32}))
    assert not torch.equal(other.train.images, data.train.images)


def test_lesion_is_inside_the_image_and_brighter_than_without_it():
    images, _, masks, background = generate_lesions(num_per_class=25, size=64, seed=3, return_background=True)
    border = masks.clone()
    border[:, 2:-2, 2:-2] = False
    assert not border.any()  # every lesion lies well inside the frame
    lift = images[:, 0].float() - background[:, 0].float()
    assert float(lift[masks].min()) >= 0.15 * 255 - 1  # contrast >= 0.18 minus rounding and rare clipping
    assert float(lift[~masks].abs().max()) == 0.0


def test_distractor_footprints_never_touch_the_lesion():
    """Known answer: rebuild the distractors from the generator's own parameters and check overlap."""
    n_per, size, seed, m = 25, 64, 7, 3
    _, labels, masks = generate_lesions(num_per_class=n_per, size=size, seed=seed, num_distractors=m)
    rng = np.random.default_rng(seed)  # same draws as generate_lesions: labels, then parameters
    labels_again = rng.permutation(np.repeat(np.arange(4), n_per))
    assert np.array_equal(labels_again, labels.numpy())
    d = _sample(rng, 4 * n_per, size, m, labels_again)["distractors"]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    present = 0
    for i in range(4 * n_per):
        for j in range(m):
            if d["amp"][i, j] == 0:
                continue
            present += 1
            px, py = xx - d["x"][i, j], yy - d["y"][i, j]
            dx, dy = np.cos(d["dir"][i, j]), np.sin(d["dir"][i, j])
            t = np.clip(px * dx + py * dy, -d["half_len"][i, j], d["half_len"][i, j])
            footprint = np.hypot(px - t * dx, py - t * dy) <= 2.5 * d["width"][i, j]
            assert footprint.any() and not (footprint & masks[i].numpy()).any()
    assert present >= 0.95 * 4 * n_per * m  # (almost) every image has all its distractors


def test_lesion_free_images_are_not_classifiable():
    """A linear (ridge) classifier on the lesion-free images stays at chance: distractors carry no label."""

    def ridge_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
        x = torch.nn.functional.avg_pool2d(images.float() / 255, 2).flatten(1)
        x = torch.cat([x, torch.ones(len(x), 1)], 1)
        y = torch.nn.functional.one_hot(labels[:600], 4).float()
        a = x[:600]
        w = torch.linalg.solve(a.T @ a + 1.0 * torch.eye(a.shape[1]), a.T @ y)
        return float((x[600:] @ w).argmax(1).eq(labels[600:]).float().mean())

    _, labels, _, background = generate_lesions(num_per_class=200, size=32, seed=8, return_background=True)
    assert ridge_accuracy(background, labels) < 0.36  # chance is 0.25 (200 test images)


def test_image_size_sets_the_generation_size_and_masks_stay_exact():
    data = build_dataset(DataConfig("lesions", image_size=40, params={"num_per_class": 10}))
    assert data.image_shape == (1, 40, 40) and data.train.masks.shape[1:] == (40, 40)
    resized = build_dataset(DataConfig("lesions", image_size=32, params={"num_per_class": 10, "size": 64}))
    assert resized.image_shape == (1, 32, 32) and resized.train.masks.shape[1:] == (32, 32)
    assert bool(resized.train.masks.flatten(1).any(1).all())


@pytest.mark.parametrize(
    "params,match",
    [
        ({"num_per_class": 0}, "data.params.num_per_class"),
        ({"size": 8}, "data.params.size"),
        ({"noise": -0.1}, "noise"),
        ({"num_distractors": 1.5}, "data.params.num_distractors"),
    ],
)
def test_bad_params_name_the_key(params, match):
    with pytest.raises(DataError, match=match):
        build_dataset(DataConfig("lesions", params=params))


def test_no_distractors_and_no_noise():
    images, _, masks, background = generate_lesions(
        num_per_class=5, size=32, seed=0, noise=0.0, num_distractors=0, return_background=True
    )
    assert images.shape == (20, 1, 32, 32) and bool(masks.flatten(1).any(1).all())
    assert not (images[:, 0] != background[:, 0])[~masks].any()


def test_large_generation_gives_every_image():
    images, labels, masks = generate_lesions(num_per_class=500, size=64, seed=0)
    assert images.shape == (2000, 1, 64, 64) and masks.shape == (2000, 64, 64)
    assert torch.bincount(labels).tolist() == [500] * 4
