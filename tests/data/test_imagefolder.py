"""imagefolder: layouts, masks twin tree, and every bad input as one clear DataError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xkd.config import DataConfig
from xkd.data import DataError, build_dataset


def make_folder(root, classes=("a", "b", "c"), n=10, size=16, mode="L", split=None, masks=False):
    rng = np.random.default_rng(0)
    base = root / split if split else root
    for k, c in enumerate(classes):
        (base / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = (rng.random((size, size)) * 60 + k * 60).astype("uint8")
            img = Image.fromarray(arr, "L").convert(mode)
            img.save(base / c / f"{c}{i}.png")
            if masks:
                mdir = (root / "masks" / split / c) if split else (root / "masks" / c)
                mdir.mkdir(parents=True, exist_ok=True)
                m = np.zeros((size, size), "uint8")
                m[2:6, 2 + i % 4 : 6 + i % 4] = 255
                Image.fromarray(m).save(mdir / f"{c}{i}.png")
    return root


def test_flat_layout_is_split_70_20_10_stratified_and_deterministic(tmp_path):
    make_folder(tmp_path)
    data = build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    assert data.class_names == ["a", "b", "c"] and data.image_shape == (1, 16, 16)
    assert (len(data.train), len(data.val), len(data.test)) == (21, 6, 3)
    assert sorted(data.test.labels.tolist()) == [0, 1, 2]
    again = build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    assert data.train.images.equal(again.train.images)
    img, label, mask = data.train[0]
    assert img.dtype.is_floating_point and 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and mask is None
    # the pixels are the file's pixels: class c images are brighter than class a's
    mean = {k: float(data.train.images[data.train.labels == k].float().mean()) for k in range(3)}
    assert mean[0] < mean[1] < mean[2]


def test_pre_split_layout_and_masks_twin_tree(tmp_path):
    for split in ("train", "test"):
        make_folder(tmp_path, n=10 if split == "train" else 4, split=split, masks=True)
    data = build_dataset(DataConfig("imagefolder", root=str(tmp_path), image_size=8))
    assert data.has_masks and (len(data.train), len(data.val), len(data.test)) == (27, 3, 12)
    img, _, mask = data.test[0]
    assert img.shape == (1, 8, 8) and mask.dtype == __import__("torch").bool and 0 < int(mask.sum()) < 64


def test_rgb_images_get_three_channels(tmp_path):
    make_folder(tmp_path, mode="RGB")
    assert build_dataset(DataConfig("imagefolder", root=str(tmp_path))).image_shape == (3, 16, 16)
    assert build_dataset(DataConfig("imagefolder", root=str(tmp_path), params={"channels": 1})).image_shape == (
        1,
        16,
        16,
    )


def test_corrupt_file_is_skipped_and_counted(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    data = build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    assert len(data.skipped_files) == 1 and data.skipped_files[0].endswith("broken.png")
    assert len(data.train) + len(data.val) + len(data.test) == 30


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "holds no class folders"),
        (lambda p: (make_folder(p), (p / "empty").mkdir()), r"class folder .*empty has no images"),
        (lambda p: make_folder(p, classes=("only",)), "at least 2"),
        (lambda p: (make_folder(p), make_folder(p, classes=("d",), size=12)), "set data.image_size"),
        (lambda p: (make_folder(p, masks=True), (p / "masks" / "a" / "a0.png").unlink()), r"1 image\(s\) have no mask"),
        (
            lambda p: (make_folder(p, classes=("a", "b")), [f.write_bytes(b"x") for f in (p / "b").iterdir()]),
            "could be read",
        ),
    ],
)
def test_bad_folders_are_one_clear_error(tmp_path, setup, match):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=match):
        build_dataset(DataConfig("imagefolder", root=str(root)))


def test_missing_root_and_unknown_param(tmp_path):
    with pytest.raises(DataError, match="needs data.root"):
        build_dataset(DataConfig("imagefolder"))
    make_folder(tmp_path)
    with pytest.raises(DataError, match="data.params.chanels is not a parameter"):
        build_dataset(DataConfig("imagefolder", root=str(tmp_path), params={"chanels": 1}))
