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


def test_corrupt_file_is_skipped_and_counted(tmp_path, caplog):
    make_folder(tmp_path)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with caplog.at_level("WARNING", logger="xkd"):
        data = build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    assert len(data.skipped_files) == 1 and data.skipped_files[0].endswith("broken.png")
    assert [r.getMessage().split(" (first")[0] for r in caplog.records] == [
        f"imagefolder: skipped 1 unreadable file(s) under {tmp_path}"
    ]  # one line: a run no longer adds a second of its own
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


# ----------------------------------------------------------------------------------------------
# lazy loading, more layouts, mask formats, and more bad inputs

import torch  # noqa: E402

from xkd.data import make_loader  # noqa: E402
from xkd.data.imagefolder import ImageFolderDataset  # noqa: E402


def test_lazy_loading_gives_the_same_data_as_in_memory(tmp_path):
    make_folder(tmp_path, masks=True)
    eager = build_dataset(DataConfig("imagefolder", root=str(tmp_path), params={"in_memory": True}))
    lazy = build_dataset(DataConfig("imagefolder", root=str(tmp_path), params={"in_memory": False}))
    assert isinstance(lazy.train, ImageFolderDataset) and lazy.has_masks and lazy.image_shape == (1, 16, 16)
    assert torch.equal(lazy.train.labels, eager.train.labels)
    for i in range(len(eager.train)):
        (a, la, ma), (b, lb, mb) = eager.train[i], lazy.train[i]
        assert torch.equal(a, b) and la == lb and torch.equal(ma, mb)
    batch = next(iter(make_loader(lazy.train, 8, shuffle=False, seed=0)))
    assert batch.images.shape == (8, 1, 16, 16) and batch.masks.shape == (8, 16, 16) and batch.masks.dtype == torch.bool
    small = build_dataset(
        DataConfig("imagefolder", root=str(tmp_path), train_size=9, params={"in_memory": False})
    )  # seeded stratified subset of a lazy split
    assert len(small.train) == 9 and torch.bincount(small.train.labels).tolist() == [3, 3, 3]


def test_pre_split_with_val_is_used_as_given(tmp_path):
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        make_folder(tmp_path, classes=("x", "y"), n=n, split=split)
    data = build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    assert data.class_names == ["x", "y"] and (len(data.train), len(data.val), len(data.test)) == (12, 6, 4)


def test_train_only_layout_carves_val_and_test(tmp_path):
    make_folder(tmp_path, classes=("x", "y"), n=20, split="train")
    data = build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    assert (len(data.train), len(data.val), len(data.test)) == (32, 4, 4)
    assert torch.bincount(data.test.labels).tolist() == [2, 2]


def test_mask_formats_rgb_palette_and_resizing(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), n=4)
    for c in ("a", "b"):
        (tmp_path / "masks" / c).mkdir(parents=True)
        for i in range(4):
            if c == "a":  # RGB: a faint blue region is still "any non-zero pixel"
                m = np.zeros((16, 16, 3), "uint8")
                m[4:8, 4:12, 2] = 1
                img = Image.fromarray(m, "RGB")
            else:  # palette: index 1 is the lesion, index 0 (black) the background
                m = np.zeros((16, 16), "uint8")
                m[4:8, 4:12] = 1
                img = Image.fromarray(m, "P")
                img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
            img.save(tmp_path / "masks" / c / f"{c}{i}.png")
    data = build_dataset(DataConfig("imagefolder", root=str(tmp_path), image_size=32))
    for ds in (data.train, data.val, data.test):
        for i in range(len(ds)):
            assert int(ds[i][2].sum()) == 4 * 4 * 8  # 32 px of mask at 16 px -> 128 at 32 px


def test_sixteen_bit_images_are_scaled(tmp_path):
    for c, value in (("dark", 1000), ("bright", 60000)):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), value, np.uint16)).save(tmp_path / c / f"{i}.png")
    data = build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    assert data.image_shape == (1, 8, 8)
    values = {data.class_names[lbl]: int(data.train.images[k].max()) for k, lbl in enumerate(data.train.labels)}
    assert values == {"dark": round(1000 / 257), "bright": round(60000 / 257)}


def test_corrupt_mask_skips_its_image(tmp_path):
    make_folder(tmp_path, masks=True)
    (tmp_path / "masks" / "a" / "a3.png").write_bytes(b"garbage")
    data = build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    assert len(data.train) + len(data.val) + len(data.test) == 29
    assert any(f.endswith("a3.png") for f in data.skipped_files)


def test_hidden_folders_and_other_files_are_ignored(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), n=5)
    (tmp_path / ".cache").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    data = build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    assert data.class_names == ["a", "b"] and len(data.train) + len(data.val) + len(data.test) == 10
    assert data.skipped_files == []


def mismatched_mask(p):
    make_folder(p, classes=("a", "b"), n=3, masks=True)
    Image.fromarray(np.zeros((8, 8), "uint8")).save(p / "masks" / "b" / "b1.png")


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: (p.mkdir(), (Image.new("L", (4, 4)).save(p / "x.png"))), "move them into one sub-folder"),
        (lambda p: (make_folder(p, split="train"), make_folder(p, classes=("z",))), "mixes split folders"),
        (lambda p: make_folder(p, split="test"), "no train folder"),
        (lambda p: (make_folder(p, split="train"), make_folder(p, classes=("q",), split="test")), "q appear in test"),
        (mismatched_mask, r"mask .*b1.png' is 8x8 but its image .* is 16x16"),
    ],
)
def test_more_bad_folders(tmp_path, setup, match):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=match):
        build_dataset(DataConfig("imagefolder", root=str(root)))


@pytest.mark.parametrize("params,match", [({"channels": 2}, "1 or 3"), ({"in_memory": "yes"}, "true or false")])
def test_bad_param_values(tmp_path, params, match):
    make_folder(tmp_path)
    with pytest.raises(DataError, match=match):
        build_dataset(DataConfig("imagefolder", root=str(tmp_path), params=params))


def test_root_that_is_a_file(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"")
    with pytest.raises(DataError, match="not a folder"):
        build_dataset(DataConfig("imagefolder", root=str(f)))


def test_concept_mask_trees_bad_input(tmp_path):
    make_folder(tmp_path, n=4)
    (tmp_path / "concepts").mkdir()
    with pytest.raises(DataError, match="holds no concept folders"):
        build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    for cat in ("texture", "colour"):
        (tmp_path / "concepts" / cat / "dots" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="dots appear under several categories"):
        build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    (tmp_path / "concepts" / "colour" / "dots" / "a").rmdir()
    (tmp_path / "concepts" / "colour" / "dots").rmdir()
    Image.fromarray(np.zeros((8, 8), "uint8")).save(tmp_path / "concepts" / "texture" / "dots" / "a" / "a1.png")
    with pytest.raises(DataError, match="concept mask .* is 8x8 but its image .* is 16x16"):
        build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
