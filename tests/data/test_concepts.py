"""The generated concepts set: deterministic, every concept category present, masks exact, label = shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xkd.config import DataConfig
from xkd.data import DataError, build_dataset, make_loader
from xkd.data.concepts import (
    CATEGORIES,
    CONCEPT_CATEGORIES,
    CONCEPT_CLASSES,
    CONCEPT_NAMES,
    PALETTE,
    SHADE,
    ConceptDataset,
    generate_concepts,
)


@pytest.fixture(scope="module")
def small():
    """30 noise-free 32 px images (so colour masks can be checked against exact pixel values)."""
    images, labels, masks, maps = generate_concepts(num_per_class=6, size=32, seed=3, noise=0.0)
    return images, labels, masks, maps, ConceptDataset(images, labels, maps)


def test_deterministic_from_the_seed():
    a = generate_concepts(num_per_class=3, size=32, seed=5)
    b = generate_concepts(num_per_class=3, size=32, seed=5)
    c = generate_concepts(num_per_class=3, size=32, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[3], c[3])


def test_shapes_types_and_balance(small):
    images, labels, masks, maps, ds = small
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [6] * 5
    assert masks.shape == (30, 32, 32) and masks.dtype == torch.bool
    assert maps.shape == (30, 4, 32, 32) and maps.dtype == torch.uint8
    image, label, mask = ds[0]  # the pipeline's (image, label, mask) contract, as lesions
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32) and 0 <= image.min() <= image.max() <= 1
    assert isinstance(label, int) and torch.equal(mask, masks[0])
    k = ds.concept_masks(0)
    assert k.shape == (len(CONCEPT_NAMES), 32, 32) and k.dtype == torch.bool
    assert torch.equal(ds.concept_masks_batch(torch.tensor([0, 7])), torch.stack([k, ds.concept_masks(7)]))
    assert ds.concept_names == CONCEPT_NAMES and ds.concept_categories == CONCEPT_CATEGORIES


def test_every_category_and_concept_is_present():
    _, _, _, maps = generate_concepts(num_per_class=20, size=32, seed=0)
    ds = ConceptDataset(torch.zeros(100, 3, 32, 32, dtype=torch.uint8), torch.zeros(100, dtype=torch.long), maps)
    present = ds.concept_masks_batch(torch.arange(100)).flatten(2).any(2).any(0)
    assert present.all(), [c for c, p in zip(CONCEPT_NAMES, present) if not p]
    assert set(CONCEPT_CATEGORIES.values()) == set(CATEGORIES) == {"object", "part", "texture", "colour"}
    assert [CONCEPT_CATEGORIES[c] for c in CONCEPT_CLASSES] == ["object"] * 5


def test_label_is_the_object_shape(small):
    _, labels, masks, _, ds = small
    all_masks = ds.concept_masks_batch(torch.arange(len(ds)))
    shapes = all_masks[:, : len(CONCEPT_CLASSES)]  # object concepts come first, in class order
    for i, y in enumerate(labels.tolist()):
        assert torch.equal(shapes[i, y], masks[i]) and masks[i].sum() > 20
        assert not shapes[i, [c for c in range(len(CONCEPT_CLASSES)) if c != y]].any()


def test_masks_are_exact_and_consistent(small):
    images, _, masks, _, ds = small
    k = ds.concept_masks_batch(torch.arange(len(ds)))
    idx = {c: i for i, c in enumerate(CONCEPT_NAMES)}
    for part in ("outline", "centre", "stripes", "dots", "checker"):  # parts and textures lie on the object
        assert not (k[:, idx[part]] & ~masks).any()
    assert not (k[:, idx["outline"]] & k[:, idx["centre"]]).any()
    textured = k[:, [idx[t] for t in ("stripes", "dots", "checker")]].any(1)
    assert not (textured & k[:, [idx["outline"], idx["centre"]]].any(1)).any()
    # colour masks mark exactly the pixels painted in that colour, or in its dark shade where the
    # texture pattern is (no noise here)
    colours = k[:, [idx[c] for c in PALETTE]]
    assert colours.sum(1).max() <= 1 and colours.any(1)[masks].all()  # one colour per pixel; the object is painted
    pixels = images.permute(0, 2, 3, 1)
    shaded = 0
    for j, rgb in enumerate(PALETTE.values()):
        full = np.asarray(rgb, np.float32)
        want, dark = (torch.tensor(np.rint(c * 255).astype(np.uint8)) for c in (full, full * np.float32(SHADE)))
        sel = colours[:, j]
        is_full, is_dark = (pixels == want).all(-1), (pixels == dark).all(-1)
        assert sel.any() and (is_full | is_dark)[sel].all()
        assert not (is_dark & sel & ~textured).any()  # the dark shade only paints texture patterns
        shaded += int((is_dark & sel).sum())
    assert 0.2 < shaded / int(textured.sum()) < 0.8  # patterns cover part of each textured surface
    palette = torch.tensor(np.rint(np.asarray(list(PALETTE.values())) * 255))
    background = pixels[~colours.any(1)].double()
    assert torch.cdist(background, palette).min() > 20  # the grey background is in no colour concept


def test_registered_builder_keeps_concepts_through_splits_and_resizing():
    data = build_dataset(DataConfig("concepts", seed=1, params={"num_per_class": 10, "size": 32}))
    assert data.has_masks and data.image_shape == (3, 32, 32) and data.class_names == CONCEPT_CLASSES
    assert (len(data.train), len(data.val), len(data.test)) == (35, 10, 5)
    assert torch.bincount(data.test.labels).tolist() == [1] * 5
    assert isinstance(data.test, ConceptDataset) and data.test.concept_masks(0).shape == (19, 32, 32)
    sub = build_dataset(
        DataConfig("concepts", seed=1, image_size=24, test_size=4, params={"num_per_class": 10, "size": 32})
    )
    assert isinstance(sub.test, ConceptDataset) and len(sub.test) == 4 and sub.image_shape == (3, 24, 24)
    image, _, mask = sub.test[0]
    assert image.shape == (3, 24, 24) and torch.equal(mask, sub.test.concept_masks(0)[sub.test[0][1]])
    batch = next(iter(make_loader(data.train, batch_size=8, shuffle=True, seed=0)))
    assert batch.images.shape == (8, 3, 32, 32) and batch.masks.shape == (8, 32, 32)


def test_bad_params_are_named():
    with pytest.raises(DataError, match="data.params.colours is not a parameter"):
        build_dataset(DataConfig("concepts", params={"colours": 3}))
    with pytest.raises(DataError, match="num_per_class must be an integer >= 1"):
        build_dataset(DataConfig("concepts", params={"num_per_class": 0}))
    with pytest.raises(DataError, match="noise must be a number"):
        generate_concepts(2, 32, noise=2.0)
